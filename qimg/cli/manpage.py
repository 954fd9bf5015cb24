"""qimg(1), written from the same text as ``qimg --help`` and ``qimg CMD --help``.

The page is committed as ``qimg/data/qimg.1`` (installed with the package); a test checks it is
current.  Regenerate it with ``python -m qimg.cli.manpage > qimg/data/qimg.1``.
"""

from __future__ import annotations

from .usage import HELP, _sections, command_help, command_names, syntax

HEAD = r""".TH QIMG 1 "" "qimg" "User Commands"
.SH NAME
qimg \- a pure-Python qemu-img: convert, inspect, check and modify disk images
.SH SYNOPSIS
.B qimg
[\fIstandard options\fR] \fIcommand\fR [\fIcommand options\fR]
.br
.B qimg help
\fIcommand\fR
.br
.B qimg
\fIcommand\fR \fB\-\-help\fR
.SH DESCRIPTION
qimg follows the command line of qemu-img 7.2: the same commands, options, output, messages and
exit statuses.  Every command's usage and options are shown by \fBqimg help\fR \fIcommand\fR.
"""

TAIL = r""".SH PIPES AND STANDARD STREAMS
A source of \fBconvert\fR may be a pipe, FIFO or socket, for instance \fI/dev/stdin\fR: raw images
and streamOptimized VMDK are converted as they stream, in bounded memory; other formats are first
spooled to a temporary file (said on stderr unless \fB\-q\fR).
.PP
The target of \fBconvert\fR may be a pipe, for instance \fI/dev/stdout\fR, for raw, vpc
(subformat=fixed), vmdk (subformat=streamOptimized) and qcow2 without \fB\-c\fR; the bytes are the
ones the same convert writes to a file.
.SH TARGETS
An existing target is written in place (symbolic links are followed; inode, owner, mode and hard
links are kept; devices are written as they are).  A new target is written as
\fINAME\fB.qimg-partial\fR beside it and renamed to \fINAME\fR once complete.
.SH PROGRESS
\fB\-p\fR on a terminal draws a bar on stderr; otherwise it prints qemu-img's
\(dq    (xx.xx/100%)\er\(dq lines on stdout.  \fB\-\-progress=json\fR prints one JSON object per line on
stderr: {"done", "total", "elapsed", "rate"}, at most ten a second, and a last line that adds
"status" ("completed", "failed" or "interrupted").
.SH SIGNALS
SIGINT and SIGTERM remove a partial target and end qimg by that signal (exit status 130 and 143 in
a shell).  SIGUSR1 prints one progress line on stderr and the command goes on.
.SH SHELL COMPLETION
\fBqimg completion\fR \fIbash\fR|\fIzsh\fR|\fIfish\fR prints a completion script, for instance
\fBeval "$(qimg completion bash)"\fR.
.SH EXIT STATUS
As qemu-img 7.2: 0 on success, 1 on errors; \fBcheck\fR and \fBcompare\fR have their own statuses
(see their sections).
.SH SEE ALSO
.BR qemu-img (1)
"""


def _esc(text: str) -> str:
    """Plain text as roff: backslashes, and a leading dot or quote, made harmless."""
    out = []
    for line in text.replace("\\", "\\e").replace("-", "\\-").splitlines():
        if line.startswith((".", "'")):
            line = "\\&" + line
        out.append(line)
    return "\n".join(out)


def _block(text: str) -> str:
    return ".nf\n" + _esc(text.rstrip("\n")) + "\n.fi\n"


def render() -> str:
    """The whole page."""
    parts = [HEAD, ".SH STANDARD OPTIONS\n"]
    options = HELP.split("\n\n", 1)[1].split("Command syntax:", 1)[0]
    parts.append(_block(options))
    parts.append(".SH PARAMETERS\n")
    parts.append(_block(_sections()[""]))
    parts.append(".SH COMMANDS\n")
    lines = syntax()
    for name in command_names():
        parts.append(f".SS {name}\n")
        parts.append(".B qimg " + name + "\n" + _esc(lines.get(name, "[options]")) + "\n.PP\n")
        own = [b for b in command_help(name).split("\n\n")[1:] if not b.startswith("Command parameters:")]
        if own:
            parts.append(_block("\n\n".join(own)))
    parts.append(TAIL)
    return "".join(parts)


if __name__ == "__main__":
    import sys

    sys.stdout.write(render())
