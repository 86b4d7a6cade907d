#!/bin/sh
# Runs inside the new Debian root (mmdebstrap customize hook): turn the bare package set into the small
# machine the guest suite drives: a serial console, DHCP on the virtio NIC, sshd with the test key, a sudo
# user (alice) and a plain user (bob), pip pointed at the wheelhouse the tests copy in, a small initrd, and
# the units that cost minutes under TCG masked.
set -eu

echo autoglm-guest > /etc/hostname
printf '127.0.0.1 localhost\n127.0.1.1 autoglm-guest\n' > /etc/hosts
printf '/dev/vda / ext4 rw,errors=remount-ro 0 1\n' > /etc/fstab
echo uninitialized > /etc/machine-id

mkdir -p /etc/systemd/network
printf '[Match]\nName=en* eth*\n\n[Network]\nDHCP=ipv4\nLinkLocalAddressing=no\nIPv6AcceptRA=no\n' \
    > /etc/systemd/network/10-dhcp.network
systemctl enable systemd-networkd.service ssh.service

# The test key (copied in as /tmp/guest_key.pub) opens root, alice and bob.
for user in alice bob; do
    useradd --create-home --shell /bin/bash "$user"
done
usermod -aG sudo alice
# A sudo user who has authenticated recently: the suite runs `sudo …` without a terminal.
echo 'alice ALL=(ALL:ALL) NOPASSWD: ALL' > /etc/sudoers.d/alice
chmod 0440 /etc/sudoers.d/alice
for home in /root /home/alice /home/bob; do
    mkdir -p "$home/.ssh"
    cp /tmp/guest_key.pub "$home/.ssh/authorized_keys"
    chmod 700 "$home/.ssh"
    chmod 600 "$home/.ssh/authorized_keys"
done
chown -R alice:alice /home/alice/.ssh
chown -R bob:bob /home/bob/.ssh
printf 'PasswordAuthentication no\nUseDNS no\n' > /etc/ssh/sshd_config.d/10-guest.conf

# The guest has no package index: pip takes what the suite copies to /var/cache/autoglm-wheelhouse.
printf '[global]\nno-index = true\nfind-links = /var/cache/autoglm-wheelhouse\ndisable-pip-version-check = true\n' \
    > /etc/pip.conf
mkdir -p /var/cache/autoglm-wheelhouse

# Minutes under TCG, nothing the tests need.
for unit in ldconfig.service systemd-journal-catalog-update.service systemd-update-done.service \
        apt-daily.timer apt-daily-upgrade.timer man-db.timer e2scrub_all.timer fstrim.timer dpkg-db-backup.timer \
        systemd-tmpfiles-clean.timer; do
    systemctl mask "$unit" >/dev/null 2>&1 || true
done
mkdir -p /etc/systemd/journald.conf.d
printf '[Journal]\nStorage=volatile\nRuntimeMaxUse=32M\n' > /etc/systemd/journald.conf.d/10-guest.conf

# A small initrd: only what mounts the virtio root.
printf 'virtio_pci\nvirtio_blk\next4\n' > /etc/initramfs-tools/modules
sed -i 's/^MODULES=.*/MODULES=list/' /etc/initramfs-tools/initramfs.conf
update-initramfs -u -k all >/dev/null
rm -f /tmp/guest_key.pub
