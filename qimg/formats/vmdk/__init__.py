"""VMDK (VMware virtual disks): descriptor + extents.

References:
    VMware, "Virtual Disk Format 1.1"; VMware, "Virtual Disk Format 5.0" (stream-optimized
    extents).  See the modules of this package for the sections each implements.
"""

from .driver import VmdkDriver

__all__ = ["VmdkDriver"]
