"""qimg completion bash|zsh|fish: a shell completion script, made from the commands' own options.

Completes subcommands, each command's options, format names after -f, -O and -F, and file names
everywhere else.  ``eval "$(qimg completion bash)"`` (or zsh; ``qimg completion fish | source``).
"""

from __future__ import annotations

import re

import click

SHELLS = ("bash", "zsh", "fish")
FORMAT_OPTIONS = ("-f", "-O", "-F")


def _options(name: str) -> tuple[list[str], list[str]]:
    """(every option of a command, the ones that take a value), from its usage line and click command."""
    from . import LazyGroup
    from .usage import syntax

    line = syntax().get(name, "")
    opts = set(re.findall(r"(?<![\w-])--?[A-Za-z][\w-]*", line))
    takes = {m.group(1) for m in re.finditer(r"\[(--?[A-Za-z][\w-]*)[ =][a-z_]", line)}
    cmd = LazyGroup().get_command(None, name)
    for p in cmd.params:
        if not isinstance(p, click.Option) or "--action" in p.opts:  # bitmap's internal action list
            continue
        opts.update(p.opts)
        if not p.is_flag:
            takes.update(p.opts)
    opts.update(("-h", "--help"))
    return sorted(opts), sorted(takes & opts)


def _data():
    from ..core.registry import format_names
    from . import COMMANDS

    commands = sorted(COMMANDS)
    table = {c: _options(c) for c in commands}
    return commands, sorted(format_names()), table


def bash() -> str:
    commands, formats, table = _data()
    cases = "\n".join(f'        {c}) opts="{" ".join(o)}";;' for c, (o, _) in table.items())
    return f"""# bash completion for qimg (qimg completion bash)
_qimg() {{
    local cur prev cmd opts
    cur="${{COMP_WORDS[COMP_CWORD]}}"
    prev="${{COMP_WORDS[COMP_CWORD-1]}}"
    if [ "$COMP_CWORD" -eq 1 ]; then
        COMPREPLY=($(compgen -W "{" ".join(commands)} help -h --help -V --version" -- "$cur"))
        return
    fi
    cmd="${{COMP_WORDS[1]}}"
    case "$cmd" in
        help) COMPREPLY=($(compgen -W "{" ".join(commands)}" -- "$cur")); return;;
        completion) COMPREPLY=($(compgen -W "{" ".join(SHELLS)}" -- "$cur")); return;;
    esac
    case "$prev" in
        {"|".join(FORMAT_OPTIONS)}) COMPREPLY=($(compgen -W "{" ".join(formats)}" -- "$cur")); return;;
    esac
    if [[ "$cur" == -* ]]; then
        case "$cmd" in
{cases}
        *) opts="";;
        esac
        COMPREPLY=($(compgen -W "$opts" -- "$cur"))
        return
    fi
    COMPREPLY=($(compgen -f -- "$cur"))
}}
complete -o filenames -o bashdefault -F _qimg qimg
"""


def zsh() -> str:
    commands, formats, table = _data()
    cases = "\n".join(f"    {c}) compadd -- {' '.join(o)};;" for c, (o, _) in table.items())
    return f"""#compdef qimg
# zsh completion for qimg (qimg completion zsh)
_qimg() {{
  local -a cmds fmts
  cmds=({" ".join(commands)})
  fmts=({" ".join(formats)})
  if (( CURRENT == 2 )); then
    compadd -a cmds
    compadd -- help -h --help -V --version
    return
  fi
  case $words[2] in
    help) compadd -a cmds; return;;
    completion) compadd -- {" ".join(SHELLS)}; return;;
  esac
  case $words[CURRENT-1] in
    {"|".join(FORMAT_OPTIONS)}) compadd -a fmts; return;;
  esac
  if [[ $PREFIX == -* ]]; then
    case $words[2] in
{cases}
    esac
    return
  fi
  _files
}}
if (( $+functions[compdef] )); then compdef _qimg qimg; fi
"""


def fish() -> str:
    commands, formats, table = _data()
    lines = ["# fish completion for qimg (qimg completion fish | source)",
             "complete -c qimg -e",
             f'complete -c qimg -n __fish_use_subcommand -f -a "{" ".join(commands)} help"',
             f'complete -c qimg -n "__fish_seen_subcommand_from help" -f -a "{" ".join(commands)}"',
             f'complete -c qimg -n "__fish_seen_subcommand_from completion" -f -a "{" ".join(SHELLS)}"']
    for c, (opts, takes) in table.items():
        cond = f'"__fish_seen_subcommand_from {c}"'
        for o in opts:
            flag = f"-s {o[1:]}" if len(o) == 2 else f"-l {o[2:]}"
            if o in FORMAT_OPTIONS:
                lines.append(f'complete -c qimg -n {cond} {flag} -x -a "{" ".join(formats)}"')
            elif o in takes:
                lines.append(f"complete -c qimg -n {cond} {flag} -r")
            else:
                lines.append(f"complete -c qimg -n {cond} {flag}")
    return "\n".join(lines) + "\n"


@click.command("completion", add_help_option=False)
@click.argument("shell", required=False)
def command(shell):
    from ..errors import UsageError

    if shell not in SHELLS:
        raise UsageError(f"completion needs a shell: {', '.join(SHELLS)}")
    click.echo({"bash": bash, "zsh": zsh, "fish": fish}[shell](), nl=False)
