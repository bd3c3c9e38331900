"""How people reach anchorless: the ``anchorless`` command line and Ray Jobs.

Verbs for what users do (``data``, ``train``, ``evaluate``, ``predict``, ``tune``,
``models``, ``submit``, ``jobs``, ``cluster``) with ``key.path=value`` overrides.
Everything here is a thin layer over ``anchorless.platform`` and
``anchorless.cluster``.
"""
