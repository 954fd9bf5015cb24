"""Usage text, worded as qemu-img 7.2 words it; each command's own help, the man page and the shell
completions are cut from this one text (``command_help``, ``qimg.cli.manpage``, ``qimg.cli.completion``)."""

HELP = """\
usage: qimg [standard options] command [command options]
qimg disk image utility (a pure-Python qemu-img 7.2)

    '-h', '--help'       display this help and exit
    '-V', '--version'    output version information and exit
    '-T', '--trace'      [[enable=]<pattern>][,events=<file>][,file=<file>]
                         specify tracing options
    '--untrusted'        open no file but the images named and what they reference inside
                         their own folder (also QIMG_UNTRUSTED=1); strict structure, bounded memory
    '--allow-dir' DIR    in untrusted mode, also allow references into DIR (repeatable)
    '--max-depth' N      the deepest backing chain opened (untrusted mode: 16)
    '--max-metadata-memory' SIZE  the metadata one open may hold (untrusted mode: 64M)

Command syntax:
  amend [--object objectdef] [--image-opts] [-p] [-q] [-f fmt] [-t cache] [--force] -o options filename
  batch [--scheduler ADDRESS | --workers N] [--results FILE [--resume]] [--untrusted] [--retries N] [--progress=json] [-q] JOBS
  bench [-c count] [-d depth] [-f fmt] [--flush-interval=flush_interval] [-i aio] [-n] [--no-drain] [-o offset] [--pattern=pattern] [-q] [-s buffer_size] [-S step_size] [-t cache] [-w] [-U] filename
  bitmap (--merge SOURCE | --add | --remove | --clear | --enable | --disable)... [-b source_file [-F source_fmt]] [-g granularity] [--object objectdef] [--image-opts | -f fmt] filename bitmap
  check [--object objectdef] [--image-opts] [-q] [-f fmt] [--output=ofmt] [-r [leaks | all]] [-T src_cache] [-U] filename
  commit [--object objectdef] [--image-opts] [-q] [-f fmt] [-t cache] [-b base] [-r rate_limit] [-d] [-p] filename
  completion {bash | zsh | fish}
  compare [--object objectdef] [--image-opts] [-f fmt] [-F fmt] [-T src_cache] [-p] [-q] [-s] [-U] filename1 filename2
  convert [--object objectdef] [--image-opts] [--target-image-opts] [--target-is-zero] [--bitmaps] [-U] [-C] [-c] [-p] [-q] [-n] [-f fmt] [-t cache] [-T src_cache] [-O output_fmt] [-B backing_file [-F backing_fmt]] [-o options] [-l snapshot_param] [-S sparse_size] [-r rate_limit] [-m num_coroutines] [-W] [--salvage] filename [filename2 [...]] output_filename
  create [--object objectdef] [-q] [-f fmt] [-b backing_file [-F backing_fmt]] [-u] [-o options] filename [size]
  dd [--image-opts] [-U] [-f fmt] [-O output_fmt] [bs=block_size] [count=blocks] [skip=blocks] if=input of=output
  info [--object objectdef] [--image-opts] [-f fmt] [--output=ofmt] [--backing-chain] [-U] filename
  inspect [-f fmt] [--allowed-formats fmt[,fmt...]] [--output=ofmt] filename
  map [--object objectdef] [--image-opts] [-f fmt] [--start-offset=offset] [--max-length=len] [--output=ofmt] [-U] filename
  measure [--output=ofmt] [-O output_fmt] [-o options] [--size N | [--object objectdef] [--image-opts] [-f fmt] [-l snapshot_param] filename]
  snapshot [--object objectdef] [--image-opts] [-U] [-q] [-l | -a snapshot | -c snapshot | -d snapshot] filename
  rebase [--object objectdef] [--image-opts] [-U] [-q] [-f fmt] [-t cache] [-T src_cache] [-p] [-u] -b backing_file [-F backing_fmt] filename
  resize [--object objectdef] [--image-opts] [-f fmt] [--preallocation=prealloc] [-q] [--shrink] filename [+ | -]size

Command parameters:
  'filename' is a disk image filename
  'objectdef' is a QEMU user creatable object definition. See the qemu(1)
    manual page for a description of the object properties. The most common
    object type is a 'secret', which is used to supply passwords and/or
    encryption keys.
  'fmt' is the disk image format. It is guessed automatically in most cases
  'cache' is the cache mode used to write the output disk image, the valid
    options are: 'none', 'writeback' (default, except for convert), 'writethrough',
    'directsync' and 'unsafe' (default for convert)
  'src_cache' is the cache mode used to read input disk images, the valid
    options are the same as for the 'cache' option
  'size' is the disk image size in bytes. Optional suffixes
    'k' or 'K' (kilobyte, 1024), 'M' (megabyte, 1024k), 'G' (gigabyte, 1024M),
    'T' (terabyte, 1024G), 'P' (petabyte, 1024T) and 'E' (exabyte, 1024P)  are
    supported. 'b' is ignored.
  'output_filename' is the destination disk image filename
  'output_fmt' is the destination format
  'options' is a comma separated list of format specific options in a
    name=value format. Use -o help for an overview of the options supported by
    the used format
  'snapshot_param' is param used for internal snapshot, format
    is 'snapshot.id=[ID],snapshot.name=[NAME]', or
    '[ID_OR_NAME]'
  '-c' indicates that target image must be compressed (qcow format only)
  '-u' allows unsafe backing chains. For rebasing, it is assumed that old and
       new backing file match exactly. The image doesn't need a working
       backing file before rebasing in this case (useful for renaming the
       backing file). For image creation, allow creating without attempting
       to open the backing file.
  '-h' shows this help and lists the supported formats; 'qimg CMD -h' and
       'qimg help CMD' show the help of one command
  '-p' show progress of command (only certain commands)
  '-q' use Quiet mode - do not print any output (except errors)
  '-S' indicates the consecutive number of bytes (defaults to 4k) that must
       contain only zeros for qimg to create a sparse image during
       conversion. If the number of bytes is 0, the source will not be scanned for
       unallocated or zero sectors, and the destination image will always be
       fully allocated
  '--output' takes the format in which the output must be done (human or json)
  '-n' skips the target volume creation (useful if the volume is created
       prior to running qimg)

Parameters to bitmap subcommand:
  'bitmap' is the name of the bitmap to manipulate, through one or more
       actions from '--add', '--remove', '--clear', '--enable', '--disable',
       or '--merge source'
  '-g granularity' sets the granularity for '--add' actions
  '-b source' and '-F src_fmt' tell '--merge' actions to find the source
       bitmaps from an alternative file

Parameters to check subcommand:
  '-r' tries to repair any inconsistencies that are found during the check.
       '-r leaks' repairs only cluster leaks, whereas '-r all' fixes all
       kinds of errors, with a higher risk of choosing the wrong fix or
       hiding corruption that has already occurred.

Parameters to convert subcommand:
  '--bitmaps' copies all top-level persistent bitmaps to destination
  '-m' specifies how many coroutines work in parallel during the convert
       process (defaults to 8)
  '-W' allow to write to the target out of order rather than sequential

Parameters to snapshot subcommand:
  'snapshot' is the name of the snapshot to create, apply or delete
  '-a' applies a snapshot (revert disk to saved state)
  '-c' creates a snapshot
  '-d' deletes a snapshot
  '-l' lists all snapshots in the given image

Parameters to compare subcommand:
  '-f' first image format
  '-F' second image format
  '-s' run in Strict mode - fail on different image size or sector allocation

Parameters to dd subcommand:
  'bs=BYTES' read and write up to BYTES bytes at a time (default: 512)
  'count=N' copy only N input blocks
  'if=FILE' read from FILE
  'of=FILE' write to FILE
  'skip=N' skip N bs-sized blocks at the start of input

"""

COPYRIGHT = "qimg is free software under the MIT license; it follows the command line of qemu-img 7.2\n"

#: what qimg adds to a command's parameters (qemu-img has no such options)
EXTRAS = {
    "inspect": """\
  '--allowed-formats' lists the formats the caller accepts; any other is a finding
  '--allow-dir', '--max-depth' and '--max-metadata-memory' (standard options) apply
  Always in untrusted mode. Exit status: 0 safe, 1 unsafe, 2 could not be inspected.
  FILE may be a pipe (/dev/stdin): it is read once, keeping only what the verdict needs.
""",
    "convert": """\
  '--progress=json' prints progress as JSON lines on stderr (see the README);
       '--progress=human' is '-p'
  A source may be a pipe, FIFO or socket (e.g. /dev/stdin): raw and streamOptimized
       vmdk stream through; other formats are spooled to a temporary file first.
  The target may be a pipe (e.g. /dev/stdout) for raw, vpc (subformat=fixed),
       vmdk (subformat=streamOptimized) and qcow2 without -c.
  A new target is written as 'output_filename.qimg-partial' and renamed when
       complete; an existing one is written in place.
""",
}


def command_names() -> list[str]:
    return sorted(syntax())


def syntax() -> dict[str, str]:
    """command -> its syntax line (after the command name)."""
    block = HELP.split("Command syntax:\n", 1)[1].split("\n\n", 1)[0]
    out = {}
    for line in block.splitlines():
        name, _, rest = line.strip().partition(" ")
        out[name] = rest
    return out


def _sections() -> dict[str, str]:
    """"Command parameters" and each "Parameters to X subcommand" block, by name ("" for the general one)."""
    out = {}
    for block in HELP.split("\n\n"):
        head, _, body = block.partition("\n")
        if head == "Command parameters:":
            out[""] = body
        elif head.startswith("Parameters to ") and head.endswith(" subcommand:"):
            out[head[len("Parameters to "):-len(" subcommand:")]] = body
    return out


def _general_items(body: str) -> list[tuple[str, str]]:
    """The general parameters as (key, text) pairs: key is the quoted word each one starts with."""
    items = []
    for line in body.splitlines():
        if line.startswith("  '"):
            items.append([line[3:line.index("'", 3)], line])
        elif items:
            items[-1][1] += "\n" + line
    return [(k, v) for k, v in items]


def command_help(name: str, formats: list[str] | None = None) -> str:
    """``qimg CMD --help``: the command's usage, the parameters it takes, its own section
    (and ``formats``, the supported format names, when given)."""
    import re

    line = syntax().get(name, "[options]")
    words = set(re.findall(r"[A-Za-z_-]+", line)) | set(re.findall(r"(?<![-\w])-[A-Za-z]\b", line))
    general = [text for key, text in _general_items(_sections()[""])
               if key in words or key.split(" ")[0] in words]
    out = [f"usage: qimg {name} {line}"]
    if general:
        out += ["", "Command parameters:", *general]
    own = _sections().get(name)
    if own:
        out += ["", f"Parameters to {name} subcommand:", own]
    if name in EXTRAS:
        out += ["", "qimg additions:", EXTRAS[name].rstrip("\n")]
    if formats:
        out += ["", "Supported formats: " + " ".join(formats)]
    return "\n".join(out) + "\n"
