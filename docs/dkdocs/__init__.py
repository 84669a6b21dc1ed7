"""Generators of the documentation pages that come from the registries and the measured results.

Nothing here is written by hand per method: ``docs/hooks.py`` calls :func:`dkdocs.site.generated`
at build time, so a new loss, scheme or synthesiser file, or a new benchmark result, shows up on
the site without touching the docs.
"""
