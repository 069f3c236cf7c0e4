#!/usr/bin/env bash
# Creates (idempotently) the Python venv that runs xtask/bench/torch_phantom.py on a CPU-only
# Linux x86_64 machine, and prints its python path on stdout (everything else goes to stderr):
#
#   PY=$(xtask/bench/setup_venv.sh) && "$PY" xtask/bench/torch_phantom.py --size 0.5b
#
# Environment:
#   PHANTOM_BENCH_VENV       venv location (default $HOME/.cache/phantom-bench-venv)
#   PHANTOM_BENCH_CUDA_LIBS  stub (default) | real
#   PYTHON                   interpreter that creates the venv (default python3, needs >= 3.10)
#
# Why this is not a plain `pip install torch`: PyPI's Linux torch wheel is the CUDA build and pulls
# ~2.6 GB of nvidia-* wheels plus triton; the CPU wheels (download.pytorch.org) are not reachable
# here. So torch goes in with --no-deps (requirements.txt), together with its pure-Python deps and
# the two small CUDA wheels libtorch_cpu.so links (cudart, cupti: ~11 MB of wheels). `import torch`
# also needs the libraries that libtorch_python.so and libtorch_cuda.so link (cudnn, cublas(Lt),
# cufft, curand, cusparse, cusparseLt, nccl, nvshmem_host, cufile). With
# PHANTOM_BENCH_CUDA_LIBS=stub (default) each becomes a few-KB no-op shared library exporting, at
# the right symbol version, exactly the symbols torch's binaries import from it (read off with
# readelf, so it follows the installed torch); nothing on the CPU path calls them, and
# torch.cuda.is_available() is False through the real cudart. It needs gcc and readelf; without
# them, or with PHANTOM_BENCH_CUDA_LIBS=real, the real wheels are installed (~2.6 GB download,
# ~4 GB on disk).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
VENV=${PHANTOM_BENCH_VENV:-$HOME/.cache/phantom-bench-venv}
PYTHON=${PYTHON:-python3}
CUDA_LIBS=${PHANTOM_BENCH_CUDA_LIBS:-stub}

log() { echo "setup_venv: $*" >&2; }

works() {
    "$VENV/bin/python" - <<'EOF'
import warnings
warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
import torch
x = torch.randn(2, 2) @ torch.randn(2, 2)
assert x.shape == (2, 2) and torch.isfinite(x).all()
EOF
}

if [ -x "$VENV/bin/python" ] && works >/dev/null 2>&1; then
    log "torch already importable in $VENV"
    echo "$VENV/bin/python"
    exit 0
fi

[ -x "$VENV/bin/python" ] || { log "creating $VENV"; "$PYTHON" -m venv "$VENV"; }
log "installing requirements.txt (torch without its CUDA dependencies)"
"$VENV/bin/pip" install --no-deps -r "$HERE/requirements.txt" >&2

SITE=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["platlib"])')

install_real() {
    log "installing the real CUDA library wheels torch links (~2.6 GB)"
    "$VENV/bin/pip" install --no-deps \
        nvidia-cudnn-cu12==9.10.2.21 nvidia-cublas-cu12==12.8.4.1 nvidia-cufft-cu12==11.3.3.83 \
        nvidia-curand-cu12==10.3.9.90 nvidia-cusparse-cu12==12.5.8.93 nvidia-cusparselt-cu12==0.7.1 \
        nvidia-nccl-cu12==2.27.5 nvidia-nvshmem-cu12==3.3.20 nvidia-nvjitlink-cu12==12.8.93 \
        nvidia-cufile-cu12==1.13.1.3 >&2
}

build_stubs() {
    log "building no-op stand-ins for the CUDA libraries under $SITE/nvidia"
    local work f pkg soname ver prefix
    work=$(mktemp -d)
    for f in "$SITE"/torch/lib/*.so* "$SITE"/torch/_C*.so; do
        readelf --dyn-syms -W "$f" | awk '$7 == "UND" { print $8 }'
    done | sort -u >"$work/und"
    # wheel dir, soname, symbol version node, prefix of the unversioned symbols it provides.
    # These directories are in the RPATH of torch's libraries.
    while read -r pkg soname ver prefix; do
        {
            grep -F "@$ver" "$work/und" | sed 's/@.*//' || true
            grep -v '@' "$work/und" | grep -E "^($prefix)" || true
        } | sort -u >"$work/syms"
        {
            echo 'int phantom_bench_cuda_stub(void) { return 1; }'
            sed 's/.*/int &(void) __attribute__((alias("phantom_bench_cuda_stub")));/' "$work/syms"
        } >"$work/stub.c"
        local vs=()
        if [ -s "$work/syms" ]; then
            { echo "$ver { global:"; sed 's/$/;/' "$work/syms"; echo "local: *; };"; } >"$work/stub.map"
            vs=(-Wl,--version-script="$work/stub.map")
        fi
        mkdir -p "$SITE/nvidia/$pkg/lib"
        gcc -shared -fPIC -O0 -Wl,-soname,"$soname" "${vs[@]}" \
            -o "$SITE/nvidia/$pkg/lib/$soname" "$work/stub.c"
        log "  $soname: $(wc -l <"$work/syms") symbols"
    done <<'LIST'
cudnn libcudnn.so.9 libcudnn.so.9 cudnn
cublas libcublas.so.12 libcublas.so.12 cublas[A-Z]
cublas libcublasLt.so.12 libcublasLt.so.12 cublasLt
cufft libcufft.so.11 libcufft.so.11 cufft
curand libcurand.so.10 libcurand.so.10 curand
cusparse libcusparse.so.12 libcusparse.so.12 cusparse[A-Z]
cusparselt libcusparseLt.so.0 libcusparseLt.so.0 cusparseLt
nccl libnccl.so.2 libnccl.so.2 nccl
nvshmem libnvshmem_host.so.3 NVSHMEM nvshmem
cufile libcufile.so.0 libcufile.so.0 cuFile
LIST
    rm -rf "$work"
}

if [ "$CUDA_LIBS" = real ]; then
    install_real
elif [ "$CUDA_LIBS" = stub ] && command -v gcc >/dev/null && command -v readelf >/dev/null; then
    build_stubs
else
    [ "$CUDA_LIBS" = stub ] && log "gcc or readelf missing: falling back to the real wheels"
    install_real
fi

if ! works >&2; then
    log "torch does not import in $VENV; see the errors above"
    exit 1
fi
log "ok: $("$VENV/bin/python" -c 'import torch; print("torch", torch.__version__)' 2>/dev/null)"
echo "$VENV/bin/python"
