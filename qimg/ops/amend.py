"""amend: change format options of an existing image through the driver's ``amend`` hook."""

from __future__ import annotations

from ..core import registry


def amend_help(fmt: str) -> str:
    return registry.get_driver(fmt).amend_help()


def amend(filename: str, options: dict, fmt: str | None = None, force: bool = False, open_options=None,
          warn=None, policy=None) -> None:
    from ..core.chain import open_for_command as open_chain

    chain = open_chain(filename, fmt, writable=True, options=open_options, warn=warn, policy=policy)  # as qemu-img
    drv = chain.top
    try:
        drv.amend(options, force)
        drv.flush()
    finally:
        chain.close()
