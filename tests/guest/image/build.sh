#!/usr/bin/env bash
# Build the guest test host's disk image (research: guest-test-host.md): Debian 13 from Debian's packages
# with mmdebstrap, no loop mounts (mkfs.ext4 -d), cached under $CACHE/image-<hash of this recipe>.
# Prints the image folder. A rerun with the recipe unchanged takes no time.
#   vmlinuz, initrd.img   the guest kernel (6.12) and a small initrd
#   base.ext4             the root file system, 3 GiB sparse; used read-only under qcow2 overlays
#   key, key.pub          the SSH key the image trusts for root, alice and bob
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
CACHE=${AUTOGLM_GUEST_CACHE:-/var/cache/autoglm-tune-test}
SUITE=trixie
MIRROR=${AUTOGLM_GUEST_MIRROR:-http://deb.debian.org/debian}
PACKAGES=systemd-sysv,login,udev,dbus,polkitd,libpam-systemd,openssh-server,sudo,python3,python3-venv
PACKAGES+=,linux-image-amd64,initramfs-tools,zstd,kmod,iproute2,procps,ca-certificates,e2fsprogs
hash=$( { cat "$0" "$here/in-chroot.sh"; echo "$SUITE $MIRROR $PACKAGES"; } | sha256sum | cut -c1-16)
out="$CACHE/image-$hash"
if [ -f "$out/done" ]; then
    echo "$out"
    exit 0
fi

for tool in mmdebstrap mkfs.ext4 qemu-system-x86_64 qemu-img zstd ssh-keygen; do
    command -v "$tool" >/dev/null || missing=1
done
if [ -n "${missing:-}" ]; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        qemu-system-x86 qemu-utils mmdebstrap e2fsprogs openssh-client zstd >/dev/null
fi

start=$(date +%s)
work=$(mktemp -d "$CACHE/build.XXXXXX" 2>/dev/null || { mkdir -p "$CACHE"; mktemp -d "$CACHE/build.XXXXXX"; })
trap 'rm -rf "$work"' EXIT
ssh-keygen -q -t ed25519 -N '' -C autoglm-guest-test -f "$work/key"
mmdebstrap --mode=root --variant=apt --quiet --components=main --include="$PACKAGES" \
    --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-include=/usr/share/doc/*/copyright' --dpkgopt='path-exclude=/usr/share/locale/*' \
    --customize-hook="copy-in $work/key.pub /tmp" \
    --customize-hook="mv \"\$1/tmp/key.pub\" \"\$1/tmp/guest_key.pub\"" \
    --customize-hook="copy-in $here/in-chroot.sh /tmp" \
    --customize-hook='chroot "$1" sh /tmp/in-chroot.sh && rm "$1/tmp/in-chroot.sh"' \
    "$SUITE" "$work/root" "deb $MIRROR $SUITE main"
cp "$work"/root/boot/vmlinuz-* "$work/vmlinuz"
cp "$work"/root/boot/initrd.img-* "$work/initrd.img"
mkfs.ext4 -q -L guestroot -d "$work/root" "$work/base.ext4" 3G
rm -rf "$work/root"
chmod 0444 "$work/base.ext4"
echo "built in $(( $(date +%s) - start )) s on $(nproc) CPUs, $(date -u +%FT%TZ)" > "$work/built"
touch "$work/done"
mv "$work" "$out"
trap - EXIT
echo "$out"
