"""`cai review`: a local page to look at the pairs, and decide about them, before training."""

from typing import Annotated, Optional

import typer

from cai.cli.root import app, reports_errors
from cai.cli.options import NoLockOpt
from cai.cli.render import err


@app.command("review", epilog=(
    "[bold]Examples[/bold]\n\n"
    "  cai review pairs.jsonl                          [dim]# opens the page; decisions → pairs.jsonl.review.jsonl[/dim]\n\n"
    "  cai review pairs.jsonl --reviewer ana --no-browser --port 8800\n\n"
    "  cai export pairs.jsonl --to trl dpo-data/       [dim]# then: the decisions applied (rejected out, swaps, edits)[/dim]"))
@reports_errors
def review(
    pairs: Annotated[str, typer.Argument(help="A file written by cai generate or cai judge (either format, compressed or not).", show_default=False)],
    filtered: Annotated[Optional[str], typer.Option("--filtered", help="The side file of dropped pairs [default: PAIRS.filtered.jsonl when it exists].", show_default=False)] = None,
    reviewer: Annotated[Optional[str], typer.Option("--reviewer", help="The name written with each decision [default: your user name].", show_default=False)] = None,
    host: Annotated[str, typer.Option("--host", help="The address to listen on. Another than 127.0.0.1 lets other machines reach the page (with the token).")] = "127.0.0.1",
    port: Annotated[Optional[int], typer.Option("--port", help="The port to listen on [default: 8765, or a free one if it is taken].", show_default=False)] = None,
    no_browser: Annotated[bool, typer.Option("--no-browser", help="Print the address only; do not open a browser.")] = False,
    no_lock: NoLockOpt = False,
) -> None:
    """A local web page over a pairs file and its side files: each pair's prompt, rejected and
    chosen side by side with a word diff, its rounds, filter reasons, repairs, judge and edit
    size; filters, sorting and search; decisions (accept, reject, swap, tie, skip, edit the
    chosen text) with keyboard shortcuts, appended to PAIRS.review.jsonl as they are made.
    `cai export` and `cai merge` then apply them. The address carries a random token; every
    request needs it. Ctrl+C stops the server."""
    import getpass
    import webbrowser

    from cai.review.server import ReviewServer

    if reviewer is None:
        try:
            reviewer = getpass.getuser()
        except Exception:           # no user name in this environment
            reviewer = None
    server = ReviewServer(pairs, filtered=filtered, host=host, port=port, reviewer=reviewer, lock=not no_lock)
    start = server.review.start()
    dropped = sum(1 for e in server.review.index.entries if e.source)
    try:
        err.print(f"reviewing {pairs}: {start['total'] - dropped:,} kept and {dropped:,} dropped pairs, "
                  f"{start['reviewed']:,} reviewed; decisions → {server.review.log.path}", highlight=False, soft_wrap=True)
        if server.review.log.torn:
            err.print("[yellow]warning:[/yellow] the decisions file ended in a torn line (a server killed mid-write); "
                      "it was cut off", highlight=False)
        if not server.httpd.loopback:
            err.print(f"[yellow]warning:[/yellow] listening on {host}: anyone who can reach it and has the address "
                      "(its token) can read the pairs and write decisions; plain HTTP, not encrypted", highlight=False)
        err.print(f"open {server.url}   (Ctrl+C stops)", highlight=False, soft_wrap=True)
        if not no_browser:
            webbrowser.open(server.url)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
    finally:
        lines = server.review.log.lines
        server.close()
    err.print(f"stopped: {lines:,} decisions in {server.review.log.path}", highlight=False)
