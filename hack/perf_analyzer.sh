#!/usr/bin/env bash
# Install Triton's perf_analyzer (the PyPI wheel's binary) so that it runs on this Debian.
#
# The wheel `perf-analyzer` 2.60 is built for glibc 2.38 (manylinux_2_38) and needs a newer
# libstdc++ than Debian 12 has, so pip will not even pick it here. This script downloads the
# wheel for that platform, unpacks its binary, fetches libc6, libstdc++6 and libgcc-s1 from
# Debian 13 (trixie) with apt (in a private apt state: the system's sources are untouched),
# unpacks them beside the binary and writes a wrapper that starts the binary through trixie's
# own dynamic loader with only those libraries (no container needed). Idempotent.
#
# Usage: bash hack/perf_analyzer.sh            -> prints the wrapper's path
#        PERF_ANALYZER_DIR=/opt/pa bash hack/perf_analyzer.sh
set -euo pipefail
cd "$(dirname "$0")/.."
DIR="${PERF_ANALYZER_DIR:-$PWD/.cache/perf_analyzer}"
VERSION="${PERF_ANALYZER_VERSION:-2.60.0}"
SUITE="${PERF_ANALYZER_DEBIAN_SUITE:-trixie}"
PYTHON="${PYTHON:-python3}"
WRAPPER="$DIR/perf_analyzer"

if [ -x "$WRAPPER" ] && "$WRAPPER" --version >/dev/null 2>&1; then
    echo "$WRAPPER"
    exit 0
fi
mkdir -p "$DIR/wheel" "$DIR/debs" "$DIR/root" "$DIR/apt/lists/partial" "$DIR/apt/cache/archives/partial"

# 1. The wheel, for the platform it was built for (pip refuses it on glibc 2.36 otherwise).
if [ ! -x "$DIR/bin/perf_analyzer" ]; then
    "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: \
        --platform manylinux_2_38_x86_64 "perf-analyzer==$VERSION" -d "$DIR/wheel" >&2
    "$PYTHON" -m zipfile -e "$DIR"/wheel/perf_analyzer-"$VERSION"-*.whl "$DIR/wheel/x"
    mkdir -p "$DIR/bin"
    cp "$DIR/wheel/x/perf_analyzer/bin/perf_analyzer" "$DIR/bin/perf_analyzer"
    chmod +x "$DIR/bin/perf_analyzer"
fi

# 2. A newer C and C++ runtime from Debian's next release, with apt's own client.
if [ ! -e "$DIR/root/usr/lib/x86_64-linux-gnu/libstdc++.so.6" ]; then
    cat >"$DIR/apt/sources.list" <<EOF
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian $SUITE main
EOF
    APT=(-o "Dir::Etc::SourceList=$DIR/apt/sources.list" -o "Dir::Etc::SourceParts=-"
        -o "Dir::State::Lists=$DIR/apt/lists" -o "Dir::Cache=$DIR/apt/cache"
        -o "APT::Get::List-Cleanup=0" -o "Debug::NoLocking=1" -o "APT::Sandbox::User=root")
    apt-get "${APT[@]}" update -qq >&2
    (cd "$DIR/debs" && apt-get "${APT[@]}" download -qq libc6 libstdc++6 libgcc-s1 >&2)
    for deb in "$DIR"/debs/*.deb; do dpkg-deb -x "$deb" "$DIR/root"; done
fi

# 3. The wrapper: trixie's loader, trixie's libraries first, then the system's (libssl, zlib).
LIBS="$DIR/root/usr/lib/x86_64-linux-gnu:$DIR/root/lib/x86_64-linux-gnu:/usr/lib/x86_64-linux-gnu:/lib/x86_64-linux-gnu"
LOADER="$DIR/root/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"
[ -e "$LOADER" ] || LOADER="$DIR/root/lib64/ld-linux-x86-64.so.2"
cat >"$WRAPPER" <<EOF
#!/bin/sh
# perf_analyzer $VERSION through Debian $SUITE's loader and C/C++ runtime (hack/perf_analyzer.sh).
exec "$LOADER" --library-path "$LIBS" "$DIR/bin/perf_analyzer" "\$@"
EOF
chmod +x "$WRAPPER"
"$WRAPPER" --version >&2 || { echo "perf_analyzer does not start; see above" >&2; exit 1; }
echo "$WRAPPER"
