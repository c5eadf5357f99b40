# This file is part of keygate. It is a cloud-init module: install it as a
# top-level module on cloud-init's Python path (cmake --install does) and list
# "keygate" in cloud_init_modules between disk_setup and mounts (the shipped
# /etc/cloud/cloud.cfg.d/90_keygate.cfg does).
"""keygate: encrypted volumes from user-data.

Formats (or encrypts in place, or enrolls) each volume named under
``keygate: volumes``, enrolls it with the keygate key servers, writes its
/etc/crypttab and /etc/fstab lines so it opens at every boot, and mounts it.
The module drives the ``keygate`` binary; it holds no cryptography of its own.

It is idempotent: a volume already enrolled, open, listed and mounted is left
alone and the log says so. A failure leaves a device as it was or fully done,
and its error names the device and the step.
"""

import json
import logging
import os
import re
import shutil
import stat
import subprocess
import tempfile

try:  # cloud-init's own modules; absent only when the validator runs alone
    from cloudinit.config.schema import (
        SchemaValidationError,
        validate_cloudconfig_schema,
    )
    from cloudinit.distros import ALL_DISTROS
    from cloudinit.settings import PER_INSTANCE
except ImportError:  # pragma: no cover
    SchemaValidationError = None
    validate_cloudconfig_schema = None
    ALL_DISTROS = "all"
    PER_INSTANCE = "once-per-instance"

from keygate_cloud_schema import EXAMPLE_DATA_VOLUME, SCHEMA

LOG = logging.getLogger(__name__)

meta = {
    "id": "cc_keygate",
    "name": "keygate",
    "title": "Encrypted volumes unlocked by a keygate key server",
    "description": __doc__,
    "distros": [ALL_DISTROS],
    "frequency": PER_INSTANCE,
    "examples": [EXAMPLE_DATA_VOLUME],
    "activate_by_schema_keys": ["keygate"],
}


class ConfigError(ValueError):
    """user-data that does not satisfy keygate's schema."""


class VolumeError(RuntimeError):
    """A step failed for one device."""

    def __init__(self, device, step, message):
        super().__init__("%s: %s failed: %s" % (device, step, message))
        self.device = device
        self.step = step


def validate(cfg):
    """Raises ConfigError, naming the key, when cfg's keygate: is invalid."""
    if validate_cloudconfig_schema is not None:
        try:
            validate_cloudconfig_schema(cfg, SCHEMA, strict=True, log_details=False)
        except SchemaValidationError as e:
            raise ConfigError("invalid keygate config: %s" % e) from None
    else:  # pragma: no cover
        raise ConfigError("cloud-init's schema validation is not available")
    conf = cfg.get("keygate", {})
    names, devices = set(), set()
    for i, vol in enumerate(conf.get("volumes", [])):
        where = "keygate.volumes.%d" % i
        if vol["name"] in names:
            raise ConfigError("%s.name: '%s' is used twice" % (where, vol["name"]))
        if vol["device"] in devices:
            raise ConfigError("%s.device: '%s' is listed twice" % (where, vol["device"]))
        names.add(vol["name"])
        devices.add(vol["device"])
        mode = vol.get("mode", "format")
        if mode == "enroll-existing" and "passphrase_file" not in vol:
            raise ConfigError("%s.passphrase_file: enroll-existing needs the "
                              "volume's current passphrase" % where)
        if mode == "encrypt-in-place" and "recovery_passphrase_file" not in vol:
            raise ConfigError("%s.recovery_passphrase_file: encrypt-in-place "
                              "needs a recovery passphrase" % where)
    if "enrollment_token" in conf and "enrollment_token_file" in conf:
        raise ConfigError("keygate.enrollment_token: give enrollment_token or "
                          "enrollment_token_file, not both")


class System:
    """What the module does to the machine, in one place (tests run it under
    a test root; the parts that need device-mapper are the only ones a test
    replaces)."""

    root = "/"

    def __init__(self):
        self.keygate = shutil.which("keygate") or next(
            (p for p in ("/usr/local/sbin/keygate", "/usr/sbin/keygate", "/sbin/keygate")
             if os.access(p, os.X_OK)),
            "keygate",
        )

    def path(self, p):
        return os.path.join(self.root, p.lstrip("/"))

    def run(self, argv, step, device, secret_input=None, quiet=False):
        """Runs argv, its output into the cloud-init log (keygate's progress
        and messages; never a secret) unless quiet; `secret_input` goes to
        its standard input (the enrollment token: never in argv, the
        environment or a file)."""
        LOG.debug("keygate: running %s", " ".join(argv[:3]))
        proc = subprocess.run(argv, input=secret_input if secret_input is not None else "",
                              capture_output=True, text=True)
        if not quiet:
            for line in (proc.stdout + proc.stderr).splitlines():
                LOG.info("keygate: %s", line)
        if proc.returncode != 0:
            tail = proc.stderr.strip().splitlines()[-1:] or ["exit %d" % proc.returncode]
            raise VolumeError(device, step, tail[0])
        return proc.stdout

    def signature(self, device):
        """The file system, partition table or RAID signature on device, or None."""
        for key in ("TYPE", "PTTYPE"):
            proc = subprocess.run(["blkid", "-p", "-o", "value", "-s", key, device],
                                  capture_output=True, text=True)
            if proc.returncode == 0 and proc.stdout.strip():
                return proc.stdout.strip()
        return None

    def uuid(self, device):
        proc = subprocess.run(["blkid", "-p", "-o", "value", "-s", "UUID", device],
                              capture_output=True, text=True)
        return proc.stdout.strip() if proc.returncode == 0 else ""

    def keygate_volume(self, device):
        """The keygate volume id on device, or None."""
        proc = subprocess.run([self.keygate, "status", device, "--json"],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            return None
        try:
            return json.loads(proc.stdout).get("keygate", {}).get("volume_id")
        except ValueError:
            return None

    def mapper(self, name):
        return "/dev/mapper/" + name

    def is_open(self, name):
        return os.path.exists(self.mapper(name))

    def open_volume(self, device, name, common):
        self.run([self.keygate, "unlock", device, name, "--deadline", "60"] + common,
                 "open", device)

    def make_filesystem(self, device, name, fs):
        self.run(["mkfs", "-t", fs, self.mapper(name)], "mkfs", device)

    def is_mounted(self, mountpoint):
        target = os.path.realpath(self.path(mountpoint))
        with open("/proc/self/mountinfo", encoding="utf-8") as f:
            for line in f:
                fields = line.split()
                if len(fields) > 4 and unescape_mountinfo(fields[4]) == target:
                    return True
        return False

    def mount(self, device, name, mountpoint):
        os.makedirs(self.path(mountpoint), mode=0o755, exist_ok=True)
        self.run(["mount", self.path(mountpoint)], "mount", device)

    def enable_network_unlock(self, device):
        """crypttab's _netdev volumes open under remote-cryptsetup.target,
        which Debian does not enable by default."""
        if shutil.which("systemctl") and self.root == "/":
            self.run(["systemctl", "enable", "remote-cryptsetup.target"], "enable boot unlock", device)

    def update_initramfs(self, device):
        if shutil.which("update-initramfs"):
            self.run(["update-initramfs", "-u"], "update-initramfs", device)
        elif shutil.which("dracut"):
            self.run(["dracut", "-f"], "dracut", device)
        else:
            raise VolumeError(device, "refresh initramfs", "neither update-initramfs nor dracut")


def unescape_mountinfo(field):
    """mountinfo writes space, tab, newline and backslash as \\ooo octal."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def resolve_device(device):
    """AWS EBS volume ids become their NVMe by-id path."""
    if device.startswith("vol-"):
        return "/dev/disk/by-id/nvme-Amazon_Elastic_Block_Store_vol" + device[4:]
    return device


def ensure_line(system, path, key, line):
    """Puts `line` in the table file `path` in place of any line whose first
    field is `key`; returns True if the file changed. Written atomically."""
    full = system.path(path)
    try:
        with open(full, encoding="utf-8") as f:
            lines = f.read().splitlines()
        mode = stat.S_IMODE(os.stat(full).st_mode)
    except FileNotFoundError:
        lines, mode = [], 0o644
    out, found = [], False
    for existing in lines:
        fields = existing.split()
        if fields and not existing.lstrip().startswith("#") and fields[0] == key:
            if found:
                continue  # a duplicate of ours
            found = True
            out.append(line)
        else:
            out.append(existing)
    if not found:
        out.append(line)
    if out == lines:
        return False
    os.makedirs(os.path.dirname(full), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(full), prefix=".keygate-")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write("\n".join(out) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, mode)
    os.rename(tmp, full)
    return True


def common_args(conf):
    args = []
    if "metadata_url" in conf:
        args += ["--metadata-url", conf["metadata_url"]]
    if "platform" in conf:
        args += ["--platform", conf["platform"]]
    return args


def configure_volume(system, conf, vol, files):
    device = resolve_device(vol["device"])
    name = vol["name"]
    mode = vol.get("mode", "format")
    common = common_args(conf)
    changes = []
    if not os.path.exists(device):
        raise VolumeError(device, "find device", "no such device")

    volume_id = system.keygate_volume(device)
    if volume_id:
        LOG.info("keygate: %s: already enrolled as volume %s", device, volume_id)
    else:
        enroll = ["--server=" + s for s in conf["servers"]] + [
            "--ca", files["ca"], "--description", "cloud-init %s (%s)" % (name, vol["device"]),
            "--tpm", conf.get("tpm", "off"),
        ] + common
        if files["token"]:
            enroll += ["--enrollment-token-file", files["token"]]
        if "tpm_pcrs" in conf:
            enroll += ["--tpm-pcrs", conf["tpm_pcrs"]]
        recovery = vol.get("recovery_passphrase_file")
        if mode == "format":
            found = system.signature(device)
            if found and not vol.get("overwrite", False):
                raise VolumeError(device, "check blank",
                                  "holds %s; left untouched (set overwrite: true to "
                                  "format it and lose its data)" % found)
            if found:
                LOG.warning("keygate: %s: overwrite: true, wiping %s", device, found)
                system.run(["wipefs", "-a", device], "wipe", device)
            args = [system.keygate, "enroll", device, "--format"] + enroll
            args += ["--recovery-passphrase-file", recovery] if recovery else ["--no-recovery"]
            system.run(args, "enroll", device, files["token_text"])
        elif mode == "enroll-existing":
            system.run([system.keygate, "enroll", device, "--passphrase-file",
                        vol["passphrase_file"]] + enroll, "enroll", device, files["token_text"])
        else:  # encrypt-in-place
            found = system.signature(device)
            if found == "crypto_LUKS":
                LOG.info("keygate: %s: resuming an interrupted encryption", device)
            elif found != "ext4":
                raise VolumeError(device, "check file system",
                                  "encrypt-in-place handles ext4, found %s" % (found or "nothing"))
            args = [system.keygate, "encrypt", device, "--recovery-passphrase-file",
                    recovery] + enroll
            if stat.S_ISBLK(os.stat(device).st_mode) and found == "ext4":
                # Room for the LUKS2 header: the file system gives up 16 MiB.
                system.run(["e2fsck", "-f", "-y", device], "check file system", device)
                header = system.run(["dumpe2fs", "-h", device], "read file system", device,
                                    quiet=True)
                blocks = int(header.split("Block count:")[1].split()[0])
                bsize = int(header.split("Block size:")[1].split()[0])
                shrink_to = blocks - (16 << 20) // bsize
                system.run(["resize2fs", device, str(shrink_to)], "shrink file system", device)
                args += ["--reduce-device-size", str(16 << 20)]
            system.run(args, "encrypt in place", device, files["token_text"])
        volume_id = system.keygate_volume(device)
        changes.append("enrolled as volume %s" % volume_id)

    if not system.is_open(name):
        system.open_volume(device, name, common)
        changes.append("opened as %s" % system.mapper(name))
    if mode == "format" and not system.signature(system.mapper(name)):
        fs = vol.get("filesystem", "ext4")
        system.make_filesystem(device, name, fs)
        changes.append("made %s" % fs)

    nofail = ",nofail" if vol.get("nofail", False) else ""
    uuid = system.uuid(device)
    if not uuid:
        raise VolumeError(device, "read LUKS UUID", "blkid found none")
    if ensure_line(system, "/etc/crypttab", name,
                   "%s UUID=%s none luks,_netdev%s" % (name, uuid, nofail)):
        changes.append("crypttab")
        system.enable_network_unlock(device)
    if "mount" in vol:
        fs = vol.get("filesystem", "ext4") if mode == "format" else "auto"
        options = vol.get("mount_options", "defaults") + ",_netdev" + nofail
        if ensure_line(system, "/etc/fstab", system.mapper(name),
                       "%s %s %s %s 0 2" % (system.mapper(name), vol["mount"], fs, options)):
            changes.append("fstab")
        if not system.is_mounted(vol["mount"]):
            system.mount(device, name, vol["mount"])
            changes.append("mounted on %s" % vol["mount"])
    if changes:
        LOG.info("keygate: %s (%s): %s", name, device, ", ".join(changes))
    else:
        LOG.info("keygate: %s (%s): nothing to do", name, device)
    return changes


def root_device(system, conf):
    root = conf.get("root", {})
    if "device" in root:
        return root["device"]
    try:
        with open(system.path("/etc/crypttab"), encoding="utf-8") as f:
            for line in f:
                fields = line.split()
                if len(fields) >= 2 and not line.lstrip().startswith("#") and \
                        fields[0] in ("root", "cryptroot"):
                    src = fields[1]
                    if src.startswith("UUID="):
                        return "/dev/disk/by-uuid/" + src[5:]
                    return src
    except FileNotFoundError:
        pass
    raise VolumeError("root", "find root device",
                      "no keygate.root.device and no root/cryptroot line in /etc/crypttab")


def rotate_root(system, conf, files):
    device = root_device(system, conf)
    marker = system.path("/var/lib/keygate/root-instance-key")
    current = system.keygate_volume(device)
    if not current:
        raise VolumeError(device, "rotate root key", "the root volume has no keygate token")
    try:
        with open(marker, encoding="utf-8") as f:
            if f.read().strip() == current:
                LOG.info("keygate: root (%s): per-instance key already in place (volume %s)",
                         device, current)
                return []
    except FileNotFoundError:
        pass
    args = [system.keygate, "rotate", device, "--ca", files["ca"]]
    if files["token"]:
        args += ["--enrollment-token-file", files["token"]]
    args += ["--server=" + s for s in conf["servers"]] + common_args(conf)
    system.run(args, "rotate root key", device, files["token_text"])
    rotated = system.keygate_volume(device)
    os.makedirs(os.path.dirname(marker), mode=0o700, exist_ok=True)
    with open(marker, "w", encoding="utf-8") as f:
        f.write(rotated + "\n")
    system.update_initramfs(device)
    LOG.info("keygate: root (%s): per-instance key (volume %s), initramfs refreshed",
             device, rotated)
    return ["rotated to volume %s" % rotated]


def run(cfg, system):
    """Validates cfg and configures every volume; raises on any failure after
    trying them all."""
    validate(cfg)
    conf = cfg["keygate"]
    failures = []
    with tempfile.TemporaryDirectory(prefix="keygate-cloud-init-") as tmp:
        os.chmod(tmp, 0o700)
        files = {"ca": os.path.join(tmp, "ca.pem"), "token": None, "token_text": None}
        with open(files["ca"], "w", encoding="utf-8") as f:
            f.write(conf["ca"])
        if "enrollment_token" in conf:
            # Handed to keygate on its standard input.
            files["token"] = "-"
            files["token_text"] = conf["enrollment_token"]
        elif "enrollment_token_file" in conf:
            files["token"] = conf["enrollment_token_file"]
        for vol in conf.get("volumes", []):
            try:
                configure_volume(system, conf, vol, files)
            except VolumeError as e:
                LOG.error("keygate: %s", e)
                failures.append(str(e))
        if conf.get("root", {}).get("rotate_instance_key", False):
            try:
                rotate_root(system, conf, files)
            except VolumeError as e:
                LOG.error("keygate: %s", e)
                failures.append(str(e))
    if failures:
        raise RuntimeError("keygate: %d step(s) failed: %s" % (len(failures), "; ".join(failures)))


def handle(name, cfg, cloud, log=None, args=None):
    """cloud-init's entry point (22.4 passes a logger; later versions do not)."""
    if "keygate" not in cfg:
        LOG.debug("keygate: no 'keygate' key in the configuration; skipping")
        return
    run(cfg, System())


def main(argv=None):
    """keygate-cloud-config validate FILE...: checks user-data files offline
    against keygate's schema (for CI of launch templates)."""
    import argparse

    import yaml

    parser = argparse.ArgumentParser(
        prog="keygate-cloud-config",
        description="Validate cloud-config user-data against keygate's schema.")
    sub = parser.add_subparsers(dest="command", required=True)
    v = sub.add_parser("validate", help="validate user-data files")
    v.add_argument("files", nargs="+")
    sub.add_parser("schema", help="print keygate's JSON schema")
    opts = parser.parse_args(argv)
    if opts.command == "schema":
        print(json.dumps(SCHEMA, indent=2))
        return 0
    status = 0
    for path in opts.files:
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
            if not text.startswith("#cloud-config"):
                raise ConfigError("does not start with '#cloud-config'")
            cfg = yaml.safe_load(text) or {}
            if not isinstance(cfg, dict):
                raise ConfigError("is not a mapping")
            validate(cfg)
            print("%s: valid" % path)
        except (ConfigError, OSError, yaml.YAMLError) as e:
            print("%s: %s" % (path, e))
            status = 1
    return status


if __name__ == "__main__":
    raise SystemExit(main())
