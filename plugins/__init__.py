"""The built-in mudsc plugins (installed as the import package ``mudsc_plugins``).

They register through the very hooks a third-party plugin uses (see
:mod:`mudsc_graph.plugin.hookspecs`); :data:`mudsc_graph.plugin.registry.DEFAULT_PLUGINS` names the modules:

- ``mudsc_plugins.layers``: layer handlers for the torch ops and modules mudsc understands;
- ``mudsc_plugins.architectures``: the model zoo (:mod:`mudsc_plugins.zoo`) as named architectures;
- ``mudsc_plugins.matching``: the matching strategies (identity, align, zip) and merge methods;
- ``mudsc_plugins.datasets``: the datasets that ship inside packages (digits, mnist5k, animal_mnist).
"""
