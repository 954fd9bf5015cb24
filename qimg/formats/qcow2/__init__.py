"""qcow2: QEMU copy-on-write images, versions 2 and 3.

References: QEMU docs/interop/qcow2.txt (the qcow2 image format specification);
qemu-img 7.2's observed behaviour for output, messages and layout.

Module layout (build on these; each has its own docstring):

- ``header.py``    Header dataclass: parse (every field checked against a named limit),
                   extensions (backing format, feature table, bitmaps, crypto header, data
                   file), feature-bit constants, ``Header.pack()``; ``read_bitmap_directory``.
- ``tables.py``    L1/L2 entry bits (L2E_OFFSET_MASK, QCOW_OFLAG_*), extended-L2 bitmaps,
                   ``decode_l2`` (table -> runs of UNALLOCATED/ZERO_PLAIN/ZERO_ALLOC/NORMAL/
                   COMPRESSED units), ``L2Cache`` (bounded LRU), ``read_table``.
- ``refcount.py``  ``Refcounts``: refcount table + blocks of 1..64-bit entries as uint64
                   arrays; ``get``, ``add``, ``alloc`` (append allocation), growing/moving the
                   table, ``flush_blocks``/``flush_table``; ``decode_block``/``encode_block``.
- ``snapshot.py``  ``Snapshot`` entries, ``read_snapshots`` (bounded), ``table_bytes``,
                   ``find_snapshot`` (id / name / id_or_name).
- ``compress.py``  compressed-cluster descriptors and the zlib/zstd codecs.
- ``create.py``    ``CREATE_OPTS`` (-o help), ``parse_spec`` (option checks with qemu's
                   messages), ``format_line_options``, ``write_new_image``.
- ``measure.py``   ``measure(options, size, src)`` like ``qemu-img measure -O qcow2``.
- ``driver.py``    ``Qcow2Driver``: open, block_status, readinto, info (bitmaps, LUKS header),
                   snapshot views (``load_snapshot`` / the "snapshot" open option), LUKS and
                   legacy AES decryption with the "encrypt.key-secret" open option, external data files.
- ``writer.py``    ``Qcow2Writer`` mixin: pwrite, write_zeroes, compressed writes,
                   preallocation, ``_flush_metadata`` (refcounts -> L2 -> L1 -> header).

Inside the driver: ``self.h`` (Header), ``self.l1`` (uint64 array), ``self._refcounts()``
(Refcounts, loaded lazily), ``self._l2_for_write(l1_index)`` (mutable L2 array; call
``self.cache.drop(l2_offset)`` after changing it), ``self._flush_metadata(sync)``,
``self.data_store`` (the external data file, or the image's own store).

Write ordering: data is written at once; metadata stays in memory until ``flush``/``finalize``/
``close`` (or a bound on dirty L2 tables) writes refcount blocks and table (and the header's
refcount fields when the table moved), then L2 tables, then L1, then the header; refcount
decrements of freed clusters come last (a crash leaks, never corrupts).  In-place writers
(images not created by this process) fdatasync between the stages; convert's new targets do not.
Clusters are only ever allocated at the end of the file.  numpy is imported on first use
(``tables.LazyNumpy``) and the L1 table is read on first use, so ``info`` needs neither.
Lifecycle operations (check, snapshots, amend, resize...) live in their own modules here.
"""

from .driver import Qcow2Driver

__all__ = ["Qcow2Driver"]
