# This file is part of keygate: the JSON schema of cc_keygate's user-data
# (``keygate:``) and its documented example, beside cc_keygate.py on
# cloud-init's Python path (cmake --install puts both there).
"""The schema cc_keygate validates ``keygate:`` user-data against."""

from textwrap import dedent

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"

SCHEMA = {
    "$schema": "http://json-schema.org/draft-04/schema#",
    "$id": "keygate-cloud-config",
    "title": "keygate cloud-config",
    "type": "object",
    "properties": {
        "keygate": {
            "type": "object",
            "description": "Encrypted volumes whose keys a keygate server "
            "releases at boot.",
            "additionalProperties": False,
            "required": ["servers", "ca"],
            "properties": {
                "servers": {
                    "type": "array",
                    "minItems": 1,
                    "maxItems": 8,
                    "items": {"type": "string", "pattern": "^https://[^\\s]+$"},
                    "description": "Key servers, tried in order (https:// URLs).",
                },
                "ca": {
                    "type": "string",
                    "pattern": "-----BEGIN CERTIFICATE-----",
                    "description": "PEM certificate of the CA the servers' TLS "
                    "certificates chain to; pinned in each volume.",
                },
                "enrollment_token": {
                    "type": "string",
                    "pattern": "^[A-Za-z0-9_-]{1,128}$",
                    "description": "One-time (or multi-use) enrollment token "
                    "from 'keygate-server token create'. Without one, the "
                    "server enrolls by attestation if its enroll_by_attestation "
                    "rules admit the instance (GCP and Azure; an AWS "
                    "instance needs a token).",
                },
                "enrollment_token_file": {
                    "type": "string",
                    "description": "A file holding the enrollment token "
                    "(for tokens delivered outside user-data).",
                },
                "tpm": {
                    "enum": ["auto", "required", "off"],
                    "default": "off",
                    "description": "Bind volumes to this instance's TPM: "
                    "auto uses one if present.",
                },
                "tpm_pcrs": {
                    "type": "string",
                    "pattern": "^[0-9]{1,2}(,[0-9]{1,2})*$",
                    "description": "PCRs quoted and bound (default 0,4,7).",
                },
                "platform": {
                    "enum": ["aws", "gcp", "azure"],
                    "description": "The cloud; detected when absent.",
                },
                "metadata_url": {
                    "type": "string",
                    "pattern": "^http://[^\\s]+$",
                    "description": "The metadata service (default "
                    "http://169.254.169.254).",
                },
                "volumes": {
                    "type": "array",
                    "maxItems": 32,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["device", "name"],
                        "properties": {
                            "device": {
                                "type": "string",
                                "pattern": "^(/[^\\s]+|vol-[0-9a-f]{8,17})$",
                                "description": "A device path, a /dev/disk/by-id "
                                "path, or an AWS EBS volume id (vol-...).",
                            },
                            "name": {
                                "type": "string",
                                "pattern": NAME_PATTERN,
                                "description": "The mapping name: "
                                "/dev/mapper/NAME and the crypttab name.",
                            },
                            "mode": {
                                "enum": ["format", "encrypt-in-place", "enroll-existing"],
                                "default": "format",
                                "description": "format a blank device; encrypt "
                                "an existing ext4 file system in place; or "
                                "enroll a volume that is already LUKS2.",
                            },
                            "overwrite": {
                                "type": "boolean",
                                "default": False,
                                "description": "format even if the device "
                                "holds a file system or partition table "
                                "(destroys it).",
                            },
                            "filesystem": {
                                "enum": ["ext4", "xfs", "btrfs"],
                                "default": "ext4",
                                "description": "Made inside the volume in "
                                "format mode.",
                            },
                            "mount": {
                                "type": "string",
                                "pattern": "^/[^\\s]*$",
                                "description": "Mount point; no fstab line "
                                "and no mount without one.",
                            },
                            "mount_options": {
                                "type": "string",
                                "pattern": "^[^\\s]+$",
                                "default": "defaults",
                            },
                            "nofail": {
                                "type": "boolean",
                                "default": False,
                                "description": "Boot on even when the volume "
                                "cannot be opened.",
                            },
                            "passphrase_file": {
                                "type": "string",
                                "description": "enroll-existing: a file "
                                "holding a current passphrase of the volume.",
                            },
                            "recovery_passphrase_file": {
                                "type": "string",
                                "description": "format / encrypt-in-place: a "
                                "file holding a recovery passphrase "
                                "(required for encrypt-in-place).",
                            },
                        },
                    },
                },
                "root": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "rotate_instance_key": {
                            "type": "boolean",
                            "default": False,
                            "description": "Replace the root volume's "
                            "image-group keyslot with a per-instance one, "
                            "then refresh the initramfs.",
                        },
                        "device": {
                            "type": "string",
                            "pattern": "^/[^\\s]+$",
                            "description": "The encrypted root device "
                            "(default: from /etc/crypttab's root entry).",
                        },
                    },
                },
            },
        }
    },
}

EXAMPLE_DATA_VOLUME = dedent(
    """\
    keygate:
      servers: [https://keys.internal:8443]
      ca: |
        -----BEGIN CERTIFICATE-----
        MIIB...
        -----END CERTIFICATE-----
      enrollment_token: kgt_0123456789abcdefghijklmnopqrstuv
      tpm: auto
      volumes:
        - device: /dev/nvme1n1
          name: data
          mode: format
          filesystem: ext4
          mount: /data
    """
)
