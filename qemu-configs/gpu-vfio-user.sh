#!/usr/bin/env bash
# Launch a QEMU guest with the GPU served by a running `gpu-backend serve` attached as a
# vfio-user-pci device, and optionally the backend's vhost-user display as a
# vhost-user-gpu-pci device. See qemu-configs/README.md for what every argument is for.
#
# Usage:
#   qemu-configs/gpu-vfio-user.sh --socket PATH [options] [-- extra QEMU args...]
#   qemu-configs/gpu-vfio-user.sh --hotplug-port ID --qmp PATH [options]   (GPU hot-plugged later)
#
# Guest (one of):
#   --kernel FILE        kernel to boot directly (default: the lab's $GUEST_KERNEL if installed)
#   --initrd FILE        initramfs for --kernel (e.g. target/guest-tests/initramfs-latest.cpio.gz)
#   --append STRING      kernel command line (default: "console=ttyS0 panic=-1 iomem=relaxed")
#   --disk FILE          boot a disk image instead (virtio-blk; raw unless the name ends in .qcow2)
#
# Options:
#   --mem SIZE           guest RAM, also the size of the shared memfd backend (default 512M)
#   --smp N              vCPUs (default 2)
#   --accel tcg|kvm|auto accelerator (default auto: kvm only if kvm_intel/kvm_amd is loaded)
#   --addr SLOT          PCI slot of the GPU (default 0x5 -> guest 0000:00:05.0)
#   --no-posted-writes   x-no-posted-writes (no effect with gpu-backend: QEMU already waits
#                        for every write of a device with mmappable regions; see README)
#   --msg-timeout MS     how long QEMU waits for a backend reply (x-msg-timeout, default 5000)
#   --pci-hole64 SIZE    size of q35's 64-bit PCI window, for BARs of hundreds of GiB (e.g. 1T)
#   --iommu              emulated Intel IOMMU (intel-iommu,caching-mode=on, before the device)
#                        and intel_iommu=on on the kernel command line: lets the guest bind
#                        the GPU to its own vfio-pci (nested VFIO, see guest-tests/README.md)
#   --display PATH       the backend's vhost-user display socket (`serve ... --display PATH`
#                        or `--guest socket=..,vram=..,display=PATH`): adds
#                        -chardev socket,id=gpu0,path=PATH -device vhost-user-gpu-pci,chardev=gpu0
#                        (the guest's virtio_gpu driver binds it; guest RAM is shared already)
#   --qmp PATH           QMP socket (-qmp unix:PATH,server=on,wait=off), e.g. to take a
#                        screendump of the display while QEMU runs headless
#   --hotplug-port ID    an empty pcie-root-port called ID to hot-plug the GPU into later with
#                        QMP device_add (README section 5); --socket becomes optional
#   --port-reserve M,P   bridge windows the port reserves: M non-prefetchable, P 64-bit
#                        prefetchable (default 64M,64M: twice a 16 MiB BAR0 and a 32 MiB slice)
#   --qemu BIN           QEMU binary (default: the lab wrapper from install.sh, else PATH)
#   --dry-run            print the command instead of running it
#
# Example (guest shell with the probe; the initramfs is built by the guest-tests harness):
#   target/debug/gpu-backend serve --profile gh200-96g --socket /tmp/gpu0.sock &
#   qemu-configs/gpu-vfio-user.sh --socket /tmp/gpu0.sock \
#       --initrd target/guest-tests/initramfs-latest.cpio.gz \
#       --append "console=ttyS0 panic=-1 iomem=relaxed gpuprobe.shell=1 gpuprobe.vram_bar=4"
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_DIR="$(cd "$SCRIPT_DIR/.." && pwd)"
LAB_ENV="${GPU_BACKEND_CACHE:-$REPO_DIR/.cache}/qemu-lab/env.sh"

usage() {
    sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'
}
die() {
    echo "gpu-vfio-user.sh: $*" >&2
    exit 2
}

socket="" kernel="" initrd="" disk="" append="console=ttyS0 panic=-1 iomem=relaxed"
mem=512M smp=2 accel=auto addr=0x5 posted=1 msg_timeout="" hole64="" qemu="" dry_run=0 iommu=0
display="" qmp="" hotplug_port="" port_reserve="64M,64M"
extra=()
while [ $# -gt 0 ]; do
    case "$1" in
        --socket) socket="${2:?--socket needs a path}"; shift 2 ;;
        --kernel) kernel="${2:?}"; shift 2 ;;
        --initrd) initrd="${2:?}"; shift 2 ;;
        --append) append="${2?}"; shift 2 ;;
        --disk) disk="${2:?}"; shift 2 ;;
        --mem) mem="${2:?}"; shift 2 ;;
        --smp) smp="${2:?}"; shift 2 ;;
        --accel) accel="${2:?}"; shift 2 ;;
        --addr) addr="${2:?}"; shift 2 ;;
        --no-posted-writes) posted=0; shift ;;
        --msg-timeout) msg_timeout="${2:?}"; shift 2 ;;
        --pci-hole64) hole64="${2:?}"; shift 2 ;;
        --iommu) iommu=1; shift ;;
        --display) display="${2:?--display needs a path}"; shift 2 ;;
        --qmp) qmp="${2:?--qmp needs a path}"; shift 2 ;;
        --hotplug-port) hotplug_port="${2:?--hotplug-port needs an id}"; shift 2 ;;
        --port-reserve) port_reserve="${2:?--port-reserve needs M,P}"; shift 2 ;;
        --qemu) qemu="${2:?}"; shift 2 ;;
        --dry-run) dry_run=1; shift ;;
        -h | --help) usage; exit 0 ;;
        --) shift; extra=("$@"); break ;;
        *) die "unknown argument '$1' (see --help)" ;;
    esac
done

[ -n "$socket" ] || [ -n "$hotplug_port" ] ||
    die "--socket PATH is required (the backend's vfio-user socket), or --hotplug-port ID"
case "$port_reserve" in
    *,*) ;;
    *) die "--port-reserve takes NONPREF,PREF64 (e.g. 64M,64M)" ;;
esac
if [ -n "$socket" ] && [ "$dry_run" = 0 ] && [ ! -S "$socket" ]; then
    die "$socket is not a listening unix socket; start 'gpu-backend serve --socket $socket' first"
fi
if [ -n "$display" ] && [ "$dry_run" = 0 ] && [ ! -S "$display" ]; then
    die "$display is not a listening unix socket; start 'gpu-backend serve ... --display $display' first"
fi

# QEMU and the default kernel from the project's lab, if installed.
if [ -f "$LAB_ENV" ]; then
    # shellcheck source=/dev/null
    . "$LAB_ENV"
fi
if [ -z "$qemu" ]; then
    qemu="${QEMU_BIN:-$(command -v qemu-system-x86_64 || true)}"
    [ -n "$qemu" ] || die "no QEMU found: run qemu-configs/install.sh or pass --qemu"
fi
if [ -z "$disk" ] && [ -z "$kernel" ]; then
    kernel="${GUEST_KERNEL:-}"
    [ -n "$kernel" ] || die "give --kernel/--initrd or --disk (or run qemu-configs/install.sh for a kernel)"
fi
[ -z "$disk" ] || [ -z "$kernel" ] || die "--disk and --kernel are mutually exclusive"

if [ "$accel" = auto ]; then
    if [ -w /dev/kvm ] && { [ -d /sys/module/kvm_intel ] || [ -d /sys/module/kvm_amd ]; }; then
        accel=kvm
    else
        accel=tcg
    fi
fi
cpu=max
[ "$accel" = kvm ] && cpu=host

# JSON -device: the only syntax QEMU accepts for vfio-user-pci's socket (a SocketAddress).
json_escape() { printf '%s' "$1" | sed 's/\\/\\\\/g; s/"/\\"/g'; }
device="{\"driver\":\"vfio-user-pci\",\"socket\":{\"type\":\"unix\",\"path\":\"$(json_escape "$socket")\"},\"addr\":\"$addr\""
[ "$posted" = 1 ] || device+=",\"x-no-posted-writes\":true"
[ -z "$msg_timeout" ] || device+=",\"x-msg-timeout\":$msg_timeout"
device+="}"

args=(
    -machine q35 -accel "$accel" -cpu "$cpu" -smp "$smp" -m "$mem"
    # Guest RAM in a shareable memfd: DMA_MAP then carries an fd the backend can mmap.
    -object "memory-backend-memfd,id=mem,size=$mem,share=on" -machine memory-backend=mem
    -nographic -nodefaults -no-reboot -serial mon:stdio
)
if [ "$iommu" = 1 ]; then
    # Must come before the vfio-user-pci device; without caching-mode QEMU cannot map its DMA.
    args+=(-device intel-iommu,caching-mode=on)
    append="$append intel_iommu=on"
fi
[ -z "$socket" ] || args+=(-device "$device")
if [ -n "$hotplug_port" ]; then
    # An empty port's windows are sized by the firmware at boot: reserve room for the GPU.
    args+=(-device "pcie-root-port,id=$hotplug_port,chassis=1,slot=1,mem-reserve=${port_reserve%%,*},pref64-reserve=${port_reserve#*,}")
fi
if [ -n "$display" ]; then
    # QEMU option syntax: a comma inside a value is written as two commas.
    args+=(-chardev "socket,id=gpu0,path=${display//,/,,}" -device vhost-user-gpu-pci,chardev=gpu0)
fi
[ -z "$qmp" ] || args+=(-qmp "unix:${qmp//,/,,},server=on,wait=off")
[ -z "$hole64" ] || args+=(-global "q35-pcihost.pci-hole64-size=$hole64")
if [ -n "$disk" ]; then
    format=raw
    case "$disk" in *.qcow2) format=qcow2 ;; esac
    args+=(-drive "file=$disk,if=virtio,format=$format")
else
    args+=(-kernel "$kernel" -append "$append")
    [ -z "$initrd" ] || args+=(-initrd "$initrd")
fi
args+=("${extra[@]}")

if [ "$dry_run" = 1 ]; then
    printf '%q ' "$qemu" "${args[@]}"
    echo
    exit 0
fi
echo "gpu-vfio-user.sh: starting QEMU ($accel); Ctrl-A X quits, Ctrl-A C toggles the monitor" >&2
exec "$qemu" "${args[@]}"
