"""Disk encryption shared by the luks format and qcow2's encrypt.format=luks / legacy aes.

References:
  - LUKS On-Disk Format Specification, version 1.2.3 (Clemens Fruhwirth): phdr layout, key slots,
    PBKDF2 key derivation, the anti-forensic (AF) splitter and its diffusion function.
  - IEEE Std 1619-2007 (XTS-AES), NIST SP 800-38A (CBC), RFC 8018 (PBKDF2).
  - dm-crypt IV generators (plain, plain64, essiv:HASH) as described in the cryptsetup FAQ / dm-crypt docs.

Modules: ``cipher`` (sector ciphers, batched over many sectors per call), ``afsplit`` (AF splitter),
``luks1`` (header parse/build, key slot unlock/add/erase).
"""
