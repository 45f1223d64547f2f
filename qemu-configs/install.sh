#!/usr/bin/env bash
# Install the QEMU lab used by the end-to-end tests into a project-local cache:
#
#   - QEMU >= 10.1 (Debian trixie-backports `qemu-system-x86`, which has `vfio-user-pci`),
#     unpacked with `dpkg -x` into a private prefix and run through that prefix's own loader;
#   - a guest kernel (`vmlinuz`) and, from the matching modules package, decompressed:
#     the guest kernel's VFIO modules (vfio, vfio_iommu_type1, irqbypass, vfio-pci-core,
#     vfio-pci) for the nested VFIO tests, which bind the served GPU to the guest's own
#     vfio-pci; and its virtio-gpu driver with the modules it needs (drm, drm_kms_helper,
#     drm_shmem_helper, virtio_dma_buf, drm_client_lib, virtio-gpu) for the display tests;
#   - `busybox-static` for the guest's userland (its `unxz` also decompresses the modules when
#     the host has no `xz`).
#
# Nothing outside the cache is touched: apt runs with a private APT_CONFIG (own sources.list,
# lists, cache and an empty dpkg status file), never with the system's /etc/apt sources.
#
# Usage: qemu-configs/install.sh [--refresh]
#   --refresh   re-resolve package versions even if a complete install is cached
#
# Environment:
#   GPU_BACKEND_CACHE   cache root (default: <repo>/.cache); the lab goes to $GPU_BACKEND_CACHE/qemu-lab
#   DEBIAN_MIRROR       Debian mirror URL (default: http://deb.debian.org/debian)
#
# Outputs (all under the lab directory):
#   env.sh                      exports QEMU_PREFIX, QEMU_BIN, GUEST_KERNEL, BUSYBOX, QEMU_VERSION,
#                               GUEST_MODULES (directory of the uncompressed .ko files),
#                               GUEST_VFIO_MODULES and GUEST_DISPLAY_MODULES (their names, in
#                               load order: dependencies first, space-separated)
#   bin/qemu-system-x86_64      wrapper running the prefix's QEMU with its own loader and firmware
#   installed.stamp             what was installed (package=version lines)
#
# Safe to run concurrently (flock) and cheap to re-run (a complete install is reused as is).
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_DIR="$(cd "$SCRIPT_DIR/.." && pwd)"
CACHE_ROOT="${GPU_BACKEND_CACHE:-$REPO_DIR/.cache}"
LAB="$CACHE_ROOT/qemu-lab"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
# Bump when the layout of the lab changes so that old caches are rebuilt.
# 2: the guest kernel's VFIO modules (modules/, GUEST_MODULES in env.sh).
# (A change of the module lists alone needs no bump: the stamp and modules/.installed record
# the lists, and a cache whose lists differ is upgraded in place.)
STAMP_FORMAT=2
MIN_QEMU_MAJOR=10
MIN_QEMU_MINOR=1

APTDIR="$LAB/apt"
PREFIX="$LAB/prefix"
KERNEL_DIR="$LAB/kernel"
BUSYBOX_DIR="$LAB/busybox"
MODULES_DIR="$LAB/modules"
# The guest kernel modules the nested VFIO tests load, in load order (dependencies first).
VFIO_MODULE_NAMES=(vfio vfio_iommu_type1 irqbypass vfio-pci-core vfio-pci)
# The virtio-gpu driver and its dependencies, in load order, for the display tests. The list
# is the closure of virtio-gpu.ko's `depends=` (its .modinfo, what depmod reads; the modules
# package ships no modules.dep, depmod writes it on install): drm_panel_orientation_quirks and
# the fbdev core are built into the kernel. The extraction below checks that every module's
# dependencies come before it in this list.
DISPLAY_MODULE_NAMES=(drm drm_kms_helper drm_shmem_helper virtio_dma_buf drm_client_lib virtio-gpu)
GUEST_MODULE_NAMES=("${VFIO_MODULE_NAMES[@]}" "${DISPLAY_MODULE_NAMES[@]}")
# What the modules directory and the stamp record, so that a cache holding other lists is
# upgraded.
MODULE_SET="vfio:${VFIO_MODULE_NAMES[*]};display:${DISPLAY_MODULE_NAMES[*]}"
MODULE_SET="${MODULE_SET// /,}"
STAMP="$LAB/installed.stamp"
WRAPPER="$LAB/bin/qemu-system-x86_64"
ENV_SH="$LAB/env.sh"
LIBDIR_REL=usr/lib/x86_64-linux-gnu
LOADER_REL="$LIBDIR_REL/ld-linux-x86-64.so.2"

REFRESH=0
for arg in "$@"; do
    case "$arg" in
        --refresh) REFRESH=1 ;;
        -h | --help)
            sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'
            exit 0
            ;;
        *)
            echo "install.sh: unknown argument '$arg' (try --help)" >&2
            exit 2
            ;;
    esac
done

T0=$SECONDS
step() { echo "==> [qemu-lab] $*"; }
die() {
    echo "install.sh: error: $*" >&2
    exit 1
}

mkdir -p "$LAB"

# ---------------------------------------------------------------------------------------------
# Lock: parallel test processes may all call this script at once.
# ---------------------------------------------------------------------------------------------
exec 9>"$LAB/.lock"
if ! flock -n 9; then
    step "another install is running; waiting for $LAB/.lock"
    flock 9
fi

# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------

# Write the wrapper script and env.sh for the prefix that is in place.
write_outputs() {
    local kernel_path="$1" busybox_path="$2" version="$3" modules_path="$4"
    mkdir -p "$LAB/bin"
    local tmp="$WRAPPER.tmp.$$"
    cat >"$tmp" <<'EOF'
#!/bin/sh
# Generated by qemu-configs/install.sh: runs the QEMU unpacked into the lab prefix through the
# prefix's own dynamic loader (the prefix holds Debian trixie libraries; the host's libc is older).
LAB_DIR=$(cd "$(dirname "$0")/.." && pwd)
P="$LAB_DIR/prefix"
LIBS="$P/usr/lib/x86_64-linux-gnu:$P/lib/x86_64-linux-gnu:$P/usr/lib:$P/usr/lib/x86_64-linux-gnu/pulseaudio"
QEMU_MODULE_DIR="$P/usr/lib/x86_64-linux-gnu/qemu"
export QEMU_MODULE_DIR
exec "$P/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2" --library-path "$LIBS" \
    --argv0 qemu-system-x86_64 "$P/usr/bin/qemu-system-x86_64" \
    -L "$P/usr/share/qemu" -L "$P/usr/share/seabios" -L "$P/usr/lib/ipxe/qemu" "$@"
EOF
    chmod 0755 "$tmp"
    mv -f "$tmp" "$WRAPPER"

    tmp="$ENV_SH.tmp.$$"
    {
        echo "# Generated by qemu-configs/install.sh; source this file."
        printf 'export QEMU_PREFIX=%q\n' "$PREFIX"
        printf 'export QEMU_BIN=%q\n' "$WRAPPER"
        printf 'export QEMU_VERSION=%q\n' "$version"
        printf 'export GUEST_KERNEL=%q\n' "$kernel_path"
        printf 'export BUSYBOX=%q\n' "$busybox_path"
        printf 'export GUEST_MODULES=%q\n' "$modules_path"
        printf 'export GUEST_VFIO_MODULES=%q\n' "${VFIO_MODULE_NAMES[*]}"
        printf 'export GUEST_DISPLAY_MODULES=%q\n' "${DISPLAY_MODULE_NAMES[*]}"
    } >"$tmp"
    mv -f "$tmp" "$ENV_SH"
}

# Print the QEMU version number (e.g. 11.1.3) of the installed wrapper.
qemu_version() {
    "$WRAPPER" --version | sed -n '1s/^QEMU emulator version \([0-9][0-9.]*\).*/\1/p'
}

# Check the QEMU in place: runs, is new enough, and has vfio-user-pci.
verify() {
    local version major minor
    version="$(qemu_version)" || die "QEMU does not run: $WRAPPER --version failed"
    [ -n "$version" ] || die "could not parse the QEMU version from '$WRAPPER --version'"
    major="${version%%.*}"
    minor="${version#*.}"
    minor="${minor%%.*}"
    if [ "$major" -lt "$MIN_QEMU_MAJOR" ] ||
        { [ "$major" -eq "$MIN_QEMU_MAJOR" ] && [ "$minor" -lt "$MIN_QEMU_MINOR" ]; }; then
        die "QEMU $version is too old: vfio-user-pci needs >= $MIN_QEMU_MAJOR.$MIN_QEMU_MINOR"
    fi
    local devices
    devices="$("$WRAPPER" -device help 2>&1)" || die "'$WRAPPER -device help' failed: $devices"
    grep -q '"vfio-user-pci"' <<<"$devices" ||
        die "QEMU $version has no vfio-user-pci device ('$WRAPPER -device help')"
    echo "$version"
}

# True if directory $1 holds every module of GUEST_MODULE_NAMES as an uncompressed .ko.
modules_complete() {
    local name
    [ -d "$1" ] || return 1
    for name in "${GUEST_MODULE_NAMES[@]}"; do
        [ -s "$1/$name.ko" ] || return 1
    done
}

# Read the value of key $1 from the stamp file (empty if absent).
stamp_get() {
    [ -f "$STAMP" ] || return 0
    sed -n "/^$1=/{s///p;q}" "$STAMP"
}

# ---------------------------------------------------------------------------------------------
# Fast path: a complete install of the current format is in place.
# ---------------------------------------------------------------------------------------------
if [ "$REFRESH" = 0 ] && [ "$(stamp_get format)" = "$STAMP_FORMAT" ] &&
    [ "$(stamp_get guest_module_set)" = "$MODULE_SET" ]; then
    kernel_path="$(stamp_get guest_kernel)"
    busybox_path="$(stamp_get busybox)"
    modules_path="$(stamp_get guest_modules)"
    if [ -f "$kernel_path" ] && [ -x "$busybox_path" ] && [ -x "$PREFIX/usr/bin/qemu-system-x86_64" ] &&
        modules_complete "$modules_path"; then
        write_outputs "$kernel_path" "$busybox_path" "$(stamp_get qemu_version)" "$modules_path"
        version="$(verify)"
        write_outputs "$kernel_path" "$busybox_path" "$version" "$modules_path"
        step "cached install is complete ($STAMP)"
        step "QEMU $version: $WRAPPER (vfio-user-pci available)"
        step "guest kernel: $kernel_path ($(stamp_get kernel_package))"
        step "guest modules: $modules_path ($(stamp_get modules_package))"
        step "busybox: $busybox_path ($(stamp_get busybox_package))"
        step "env: $ENV_SH (done in $((SECONDS - T0)) s)"
        exit 0
    fi
    step "stamp found but files are missing; repairing"
elif [ "$REFRESH" = 0 ] && [ -f "$STAMP" ]; then
    step "the cached install predates this script's module lists; upgrading"
fi

for tool in apt-get apt-cache dpkg-deb flock realpath tar; do
    command -v "$tool" >/dev/null || die "'$tool' is needed but not installed"
done
[ -r "$KEYRING" ] || die "Debian archive keyring $KEYRING not found (package debian-archive-keyring)"

# ---------------------------------------------------------------------------------------------
# Private apt configuration
# ---------------------------------------------------------------------------------------------
step "private apt configuration in $APTDIR"
mkdir -p "$APTDIR"/{etc/parts,etc/preferences.d,state/lists/partial,cache/archives/partial,downloads}
: >"$APTDIR/state/status.empty"
cat >"$APTDIR/etc/sources.list" <<EOF
deb [signed-by=$KEYRING] $MIRROR trixie main
deb [signed-by=$KEYRING] $MIRROR trixie-backports main
EOF
cat >"$APTDIR/etc/apt.conf" <<EOF
// Private apt configuration of qemu-configs/install.sh. The system's /etc/apt is not used.
Dir::Etc::SourceList "$APTDIR/etc/sources.list";
Dir::Etc::SourceParts "$APTDIR/etc/parts";
Dir::Etc::Parts "$APTDIR/etc/parts";
Dir::Etc::Preferences "$APTDIR/etc/preferences";
Dir::Etc::PreferencesParts "$APTDIR/etc/preferences.d";
Dir::State "$APTDIR/state";
Dir::State::Lists "$APTDIR/state/lists";
// Empty status file: nothing counts as installed, so the whole dependency closure is resolved.
Dir::State::status "$APTDIR/state/status.empty";
Dir::Cache "$APTDIR/cache";
Dir::Cache::archives "$APTDIR/cache/archives";
Debug::NoLocking "true";
// Everything lives in a private, root-owned cache the _apt sandbox user may not be able to reach.
APT::Sandbox::User "root";
APT::Architecture "amd64";
APT::Architectures { "amd64"; };
APT::Install-Recommends "false";
APT::Install-Suggests "false";
Acquire::Languages "none";
// Keep the package lists compressed on disk (about 100 MB less).
Acquire::GzipIndexes "true";
EOF
export APT_CONFIG="$APTDIR/etc/apt.conf"

step "apt-get update (trixie, trixie-backports from $MIRROR)"
# --error-on=any: an unreachable mirror or a bad signature is an error, not a warning.
apt-get update --error-on=any

# ---------------------------------------------------------------------------------------------
# Resolve what to install
# ---------------------------------------------------------------------------------------------
candidate() { # $1=package [$2=release] -> candidate version (empty if none)
    if [ $# -gt 1 ]; then
        apt-cache policy -t "$2" "$1" | sed -n 's/^  Candidate: //p' | grep -v '(none)' || true
    else
        apt-cache policy "$1" | sed -n 's/^  Candidate: //p' | grep -v '(none)' || true
    fi
}

QEMU_PKG_VERSION="$(candidate qemu-system-x86 trixie-backports)"
[ -n "$QEMU_PKG_VERSION" ] || die "qemu-system-x86 not found in trixie-backports"

# Kernel: trixie-backports' small linux-binary-<ver>+deb13-amd64 (vmlinuz only), newest first;
# else trixie's linux-image-amd64 (the full image package its metapackage points to).
KERNEL_PKG="$(apt-cache pkgnames linux-binary- | grep -E '^linux-binary-[0-9][0-9.]*\+deb13-amd64$' |
    sort -V | tail -n1 || true)"
if [ -n "$KERNEL_PKG" ]; then
    KERNEL_VERSION="$(candidate "$KERNEL_PKG" trixie-backports)"
else
    KERNEL_PKG="$(apt-cache depends -t trixie linux-image-amd64 |
        sed -n 's/^  Depends: \(linux-image-[0-9][^ ]*\)$/\1/p' | head -n1)"
    [ -n "$KERNEL_PKG" ] || die "no guest kernel package found (linux-binary-*-amd64 or linux-image-amd64)"
    KERNEL_VERSION="$(candidate "$KERNEL_PKG" trixie)"
fi
[ -n "$KERNEL_VERSION" ] || die "no candidate version for $KERNEL_PKG"

# Modules: trixie-backports splits linux-binary-<ver> (vmlinuz) from linux-modules-<ver> (the
# modules of the same build); trixie's linux-image-<ver> holds both.
case "$KERNEL_PKG" in
    linux-binary-*)
        MODULES_PKG="linux-modules-${KERNEL_PKG#linux-binary-}"
        MODULES_VERSION="$(candidate "$MODULES_PKG" trixie-backports)"
        [ "$MODULES_VERSION" = "$KERNEL_VERSION" ] ||
            die "$MODULES_PKG has version '${MODULES_VERSION:-none}', not $KERNEL_VERSION like $KERNEL_PKG"
        ;;
    *)
        MODULES_PKG="$KERNEL_PKG"
        MODULES_VERSION="$KERNEL_VERSION"
        ;;
esac

BUSYBOX_VERSION="$(candidate busybox-static trixie)"
[ -n "$BUSYBOX_VERSION" ] || die "busybox-static not found in trixie"

step "selected: qemu-system-x86=$QEMU_PKG_VERSION $KERNEL_PKG=$KERNEL_VERSION $MODULES_PKG=$MODULES_VERSION busybox-static=$BUSYBOX_VERSION"

# Download one package (no dependencies) into $APTDIR/downloads; print the .deb path.
download_one() { # $1=package $2=version
    local deb
    deb="$APTDIR/downloads/${1}_${2//:/%3a}_amd64.deb"
    if [ ! -f "$deb" ]; then
        (cd "$APTDIR/downloads" && apt-get download "$1=$2" >&2)
    fi
    [ -f "$deb" ] || die "download of $1=$2 did not produce $deb"
    echo "$deb"
}

# Rewrite absolute symlinks inside $1 so that they point into $1 (relative links).
fix_symlinks() {
    local root="$1" link target
    while IFS= read -r -d '' link; do
        target="$(readlink "$link")"
        case "$target" in
            /*)
                ln -sfn "$(realpath -m --relative-to="$(dirname "$link")" "$root$target")" "$link"
                ;;
        esac
    done < <(find "$root" -type l -print0)
}

# ---------------------------------------------------------------------------------------------
# QEMU prefix
# ---------------------------------------------------------------------------------------------
QEMU_WANT="qemu-system-x86=$QEMU_PKG_VERSION"
if [ "$(cat "$PREFIX/.installed" 2>/dev/null || true)" = "$QEMU_WANT" ]; then
    step "QEMU prefix already holds $QEMU_WANT"
else
    step "downloading qemu-system-x86 $QEMU_PKG_VERSION and its dependency closure"
    apt-get -y --download-only install -t trixie-backports "qemu-system-x86=$QEMU_PKG_VERSION"
    # The closure, as "name version arch" lines, from a simulated install on the empty status.
    mapfile -t closure < <(apt-get -s -q install -t trixie-backports "qemu-system-x86=$QEMU_PKG_VERSION" |
        awk '$1 == "Inst" {
                ver = substr($3, 2)
                if (match($0, /\[[a-z0-9]+\]\)/)) arch = substr($0, RSTART + 1, RLENGTH - 3); else arch = "amd64"
                print $2, ver, arch
            }')
    [ "${#closure[@]}" -gt 0 ] || die "apt resolved no packages for qemu-system-x86"
    step "unpacking ${#closure[@]} packages into $PREFIX"
    rm -rf "$PREFIX.new"
    mkdir -p "$PREFIX.new"
    for entry in "${closure[@]}"; do
        read -r name ver arch <<<"$entry"
        deb="$APTDIR/cache/archives/${name}_${ver//:/%3a}_${arch}.deb"
        [ -f "$deb" ] || die "expected downloaded package $deb is missing"
        dpkg-deb -x "$deb" "$PREFIX.new"
        echo "$name=$ver" >>"$PREFIX.new/.packages"
    done
    fix_symlinks "$PREFIX.new"
    [ -x "$PREFIX.new/$LOADER_REL" ] || die "no loader at $LOADER_REL in the unpacked prefix"
    [ -x "$PREFIX.new/usr/bin/qemu-system-x86_64" ] || die "no usr/bin/qemu-system-x86_64 in the prefix"
    echo "$QEMU_WANT" >"$PREFIX.new/.installed"
    rm -rf "$PREFIX.old"
    if [ -d "$PREFIX" ]; then mv "$PREFIX" "$PREFIX.old"; fi
    mv "$PREFIX.new" "$PREFIX"
    rm -rf "$PREFIX.old"
    step "QEMU prefix ready: $(du -sh "$PREFIX" | cut -f1) unpacked"
fi

# ---------------------------------------------------------------------------------------------
# Guest kernel
# ---------------------------------------------------------------------------------------------
KERNEL_WANT="$KERNEL_PKG=$KERNEL_VERSION"
if [ "$(cat "$KERNEL_DIR/.installed" 2>/dev/null || true)" = "$KERNEL_WANT" ] && [ -f "$KERNEL_DIR/vmlinuz" ]; then
    step "guest kernel already installed: $KERNEL_WANT"
else
    step "downloading guest kernel $KERNEL_WANT"
    deb="$(download_one "$KERNEL_PKG" "$KERNEL_VERSION")"
    tmpx="$LAB/kernel.extract.$$"
    rm -rf "$tmpx"
    mkdir -p "$tmpx"
    dpkg-deb -x "$deb" "$tmpx"
    # linux-binary-* ships usr/lib/modules/<release>/vmlinuz; linux-image-* ships boot/vmlinuz-<release>.
    vmlinuz="$(find "$tmpx" \( -path '*/boot/vmlinuz-*' -o -path '*/lib/modules/*/vmlinuz' \) -type f | sort | head -n1)"
    [ -n "$vmlinuz" ] || die "$KERNEL_PKG contains no vmlinuz (looked in boot/ and usr/lib/modules/)"
    mkdir -p "$KERNEL_DIR"
    cp -f "$vmlinuz" "$KERNEL_DIR/vmlinuz.tmp"
    mv -f "$KERNEL_DIR/vmlinuz.tmp" "$KERNEL_DIR/vmlinuz"
    case "$vmlinuz" in
        */lib/modules/*) release="$(basename "$(dirname "$vmlinuz")")" ;;
        *) release="$(basename "$vmlinuz")" && release="${release#vmlinuz-}" ;;
    esac
    echo "$release" >"$KERNEL_DIR/.release"
    rm -rf "$tmpx"
    echo "$KERNEL_WANT" >"$KERNEL_DIR/.installed"
fi

# ---------------------------------------------------------------------------------------------
# busybox-static
# ---------------------------------------------------------------------------------------------
BUSYBOX_WANT="busybox-static=$BUSYBOX_VERSION"
if [ "$(cat "$BUSYBOX_DIR/.installed" 2>/dev/null || true)" = "$BUSYBOX_WANT" ] && [ -x "$BUSYBOX_DIR/busybox" ]; then
    step "busybox already installed: $BUSYBOX_WANT"
else
    step "downloading $BUSYBOX_WANT"
    deb="$(download_one busybox-static "$BUSYBOX_VERSION")"
    tmpx="$LAB/busybox.extract.$$"
    rm -rf "$tmpx"
    mkdir -p "$tmpx" "$BUSYBOX_DIR"
    dpkg-deb -x "$deb" "$tmpx"
    [ -x "$tmpx/usr/bin/busybox" ] || [ -x "$tmpx/bin/busybox" ] || die "busybox-static contains no busybox binary"
    if [ -x "$tmpx/usr/bin/busybox" ]; then src="$tmpx/usr/bin/busybox"; else src="$tmpx/bin/busybox"; fi
    cp -f "$src" "$BUSYBOX_DIR/busybox.tmp"
    mv -f "$BUSYBOX_DIR/busybox.tmp" "$BUSYBOX_DIR/busybox"
    rm -rf "$tmpx"
    echo "$BUSYBOX_WANT" >"$BUSYBOX_DIR/.installed"
fi

# ---------------------------------------------------------------------------------------------
# Guest kernel modules (VFIO), decompressed
# ---------------------------------------------------------------------------------------------

# Decompress $1 (.ko, .ko.xz or .ko.zst) to $2. .xz: the host's xz, else the lab's busybox
# (its unxz applet); .zst: the host's zstd, else Debian's zstd unpacked into the lab and run
# through the QEMU prefix's loader (nothing is installed into the system).
decompress_module() {
    local src="$1" dst="$2"
    case "$src" in
        *.ko) cp -f "$src" "$dst" ;;
        *.ko.xz)
            if command -v xz >/dev/null; then
                xz -dc "$src" >"$dst"
            else
                "$BUSYBOX_DIR/busybox" unxz -c "$src" >"$dst"
            fi
            ;;
        *.ko.zst)
            if command -v zstd >/dev/null; then
                zstd -q -dc "$src" >"$dst"
            else
                lab_zstd -q -dc "$src" >"$dst"
            fi
            ;;
        *) die "unknown module compression: $src" ;;
    esac
}

# Debian's zstd and the libraries it needs that the QEMU prefix lacks, unpacked into $LAB/tools
# and run through the prefix's loader.
lab_zstd() {
    local tools="$LAB/tools" pkg ver deb
    if [ ! -x "$tools/usr/bin/zstd" ]; then
        step "no zstd on the host: unpacking Debian's zstd into $tools"
        mkdir -p "$tools"
        for pkg in zstd liblz4-1 liblzma5; do
            ver="$(candidate "$pkg" trixie)"
            [ -n "$ver" ] || die "$pkg not found in trixie"
            deb="$(download_one "$pkg" "$ver")"
            dpkg-deb -x "$deb" "$tools"
        done
    fi
    "$PREFIX/$LOADER_REL" --library-path "$tools/$LIBDIR_REL:$PREFIX/$LIBDIR_REL:$PREFIX/lib/x86_64-linux-gnu" \
        "$tools/usr/bin/zstd" "$@"
}

# Die unless every module of the list $2... (uncompressed, in directory $1) has each module its
# .modinfo `depends=` names earlier in the list (names compare with - and _ alike).
check_load_order() {
    local dir="$1" name dep deps seen=" "
    shift
    for name in "$@"; do
        deps="$(tr '\0' '\n' <"$dir/$name.ko" | sed -n 's/^depends=//p' | head -n1)"
        for dep in ${deps//,/ }; do
            case "$seen" in
                *" ${dep//-/_} "*) ;;
                *) die "$name.ko depends on $dep, which is not loaded before it (list: $*)" ;;
            esac
        done
        seen="$seen${name//-/_} "
    done
}

MODULES_WANT="$MODULES_PKG=$MODULES_VERSION $MODULE_SET"
RELEASE="$(cat "$KERNEL_DIR/.release")"
if [ "$(cat "$MODULES_DIR/.installed" 2>/dev/null || true)" = "$MODULES_WANT" ] && modules_complete "$MODULES_DIR"; then
    step "guest modules already installed: $MODULES_WANT"
else
    step "extracting guest modules from $MODULES_PKG=$MODULES_VERSION: ${GUEST_MODULE_NAMES[*]}"
    deb="$(download_one "$MODULES_PKG" "$MODULES_VERSION")"
    tmpx="$LAB/modules.extract.$$"
    rm -rf "$tmpx" "$MODULES_DIR.new"
    mkdir -p "$tmpx" "$MODULES_DIR.new"
    patterns=()
    for name in "${GUEST_MODULE_NAMES[@]}"; do
        patterns+=("*/lib/modules/$RELEASE/kernel/*/$name.ko" "*/lib/modules/$RELEASE/kernel/*/$name.ko.*")
    done
    # Only the wanted files (tar exits non-zero if a pattern matched nothing: checked below).
    dpkg-deb --fsys-tarfile "$deb" | tar -x -C "$tmpx" --wildcards "${patterns[@]}" 2>/dev/null || true
    for name in "${GUEST_MODULE_NAMES[@]}"; do
        src="$(find "$tmpx" -path "*/lib/modules/$RELEASE/*" \( -name "$name.ko" -o -name "$name.ko.*" \) -type f |
            sort | head -n1)"
        [ -n "$src" ] || die "$MODULES_PKG has no $name.ko* under lib/modules/$RELEASE"
        decompress_module "$src" "$MODULES_DIR.new/$name.ko"
        # A module only loads into the kernel it was built for: check its vermagic.
        grep -aq "vermagic=$RELEASE " "$MODULES_DIR.new/$name.ko" ||
            die "$name.ko from $MODULES_PKG=$MODULES_VERSION was not built for kernel $RELEASE (vermagic)"
    done
    check_load_order "$MODULES_DIR.new" "${VFIO_MODULE_NAMES[@]}"
    check_load_order "$MODULES_DIR.new" "${DISPLAY_MODULE_NAMES[@]}"
    echo "$RELEASE" >"$MODULES_DIR.new/.release"
    echo "$MODULES_WANT" >"$MODULES_DIR.new/.installed"
    rm -rf "$MODULES_DIR.old"
    if [ -d "$MODULES_DIR" ]; then mv "$MODULES_DIR" "$MODULES_DIR.old"; fi
    mv "$MODULES_DIR.new" "$MODULES_DIR"
    rm -rf "$MODULES_DIR.old" "$tmpx"
fi

# ---------------------------------------------------------------------------------------------
# Wrapper, verification, stamp
# ---------------------------------------------------------------------------------------------
write_outputs "$KERNEL_DIR/vmlinuz" "$BUSYBOX_DIR/busybox" "" "$MODULES_DIR"
step "verifying QEMU ($WRAPPER)"
version="$(verify)"
write_outputs "$KERNEL_DIR/vmlinuz" "$BUSYBOX_DIR/busybox" "$version" "$MODULES_DIR"

tmp="$STAMP.tmp.$$"
{
    echo "format=$STAMP_FORMAT"
    echo "qemu_package=$QEMU_WANT"
    echo "qemu_version=$version"
    echo "kernel_package=$KERNEL_WANT"
    echo "kernel_release=$(cat "$KERNEL_DIR/.release")"
    echo "guest_kernel=$KERNEL_DIR/vmlinuz"
    echo "modules_package=$MODULES_WANT"
    echo "guest_modules=$MODULES_DIR"
    echo "guest_module_set=$MODULE_SET"
    echo "busybox_package=$BUSYBOX_WANT"
    echo "busybox=$BUSYBOX_DIR/busybox"
    echo "installed_at=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
    sed 's/^/prefix_package=/' "$PREFIX/.packages"
} >"$tmp"
mv -f "$tmp" "$STAMP"

step "QEMU $version: $WRAPPER (vfio-user-pci available)"
step "guest kernel: $KERNEL_DIR/vmlinuz ($KERNEL_WANT)"
step "guest modules: $MODULES_DIR ($MODULES_WANT)"
step "busybox: $BUSYBOX_DIR/busybox ($BUSYBOX_WANT)"
step "env: $ENV_SH (done in $((SECONDS - T0)) s)"
