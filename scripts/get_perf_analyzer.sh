#!/usr/bin/env bash
# Fetches Triton's perf_analyzer, the C++ load generator that Triton's own numbers
# come from, into var/tools/perf_analyzer (or $1), for bench/predict.py to drive
# tlserve's KServe v2 endpoint with it.
#
# Where it comes from: the tritonclient 2.41.0 wheel for Linux x86_64 ships the
# binary (newer wheels don't; the `perf-analyzer` package on PyPI is an empty
# placeholder). It links libcudart.so.12, taken from NVIDIA's
# nvidia-cuda-runtime-cu12 wheel (it loads without a GPU), and libb64 (Debian
# package libb64-0d, installed here when running as root with apt-get).
#
#   scripts/get_perf_analyzer.sh              # then: var/tools/perf_analyzer/perf_analyzer --version
set -euo pipefail
cd "$(dirname "$0")/.."

dest=${1:-var/tools/perf_analyzer}
python=${PYTHON:-.venv/bin/python}
[ -x "$python" ] || python=python3
tritonclient=tritonclient==2.41.0
cudart=nvidia-cuda-runtime-cu12==12.9.79

if [ "$(uname -sm)" != "Linux x86_64" ]; then
    echo "perf_analyzer from the tritonclient wheel runs on Linux x86_64 only (this is $(uname -sm))" >&2
    exit 1
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$dest/lib"

"$python" -m pip download --quiet --no-deps --only-binary=:all: --platform manylinux1_x86_64 \
    --python-version 3 --implementation py -d "$work" "$tritonclient"
"$python" -m pip download --quiet --no-deps --only-binary=:all: --platform manylinux2014_x86_64 \
    --python-version 3 --implementation py -d "$work" "$cudart"

"$python" - "$work" "$dest" <<'EOF'
import pathlib, stat, sys, zipfile

work, dest = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
wanted = {"bin/perf_analyzer": dest / "perf_analyzer.bin", "lib/libcudart.so.12": dest / "lib" / "libcudart.so.12"}
for wheel in sorted(work.glob("*.whl")):
    with zipfile.ZipFile(wheel) as z:
        for name in z.namelist():
            for suffix, target in wanted.items():
                if name.endswith(suffix):
                    target.write_bytes(z.read(name))
                    target.chmod(target.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
missing = [str(t) for t in wanted.values() if not t.exists()]
if missing:
    sys.exit(f"not found in the downloaded wheels: {', '.join(missing)}")
EOF

if ! ldconfig -p 2>/dev/null | grep -q 'libb64\.so\.0d'; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        apt-get install -y -qq libb64-0d >/dev/null || { apt-get update -qq && apt-get install -y -qq libb64-0d >/dev/null; }
    else
        echo "perf_analyzer needs libb64 (Debian/Ubuntu: apt-get install libb64-0d)" >&2
        exit 1
    fi
fi

cat > "$dest/perf_analyzer" <<'EOF'
#!/usr/bin/env bash
# perf_analyzer with the libcudart it links (see scripts/get_perf_analyzer.sh).
here=$(cd "$(dirname "$0")" && pwd)
LD_LIBRARY_PATH="$here/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" exec "$here/perf_analyzer.bin" "$@"
EOF
chmod +x "$dest/perf_analyzer"
"$dest/perf_analyzer" --version >/dev/null 2>&1 || "$dest/perf_analyzer" 2>&1 | grep -q "perf_analyzer" \
    || { echo "perf_analyzer was fetched but does not start" >&2; exit 1; }
echo "perf_analyzer ready: $dest/perf_analyzer"
