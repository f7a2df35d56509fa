"""The ``mudsc`` command line (installed as the import package ``mudsc_cli``).

One module per command (``inspect_cmd``, ``plugins_cmd``); :mod:`mudsc_cli.app` assembles the
Typer app and its ``main()`` entry point; :mod:`mudsc_cli.gen_docs` renders ``docs/cli.md``.
The core (:mod:`mudsc_graph`) never imports this package.
"""
