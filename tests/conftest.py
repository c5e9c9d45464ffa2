"""Shared pytest setup for every test folder.

Tests live in folders that mirror the layout (contract/, training/, service/, deploy/, e2e/). This
file sits at the top so that, with pytest's default prepend import mode, ``tests/`` is on sys.path
and the helper modules beside it (``service_helpers``, ``training_helpers``, ``eval_helpers``) import
the same way from every folder. Test file names stay unique across folders for the same reason.
"""
