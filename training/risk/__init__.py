"""The MLOps risk register (``shared/risk-matrix.md``) as code: register, metrics, alerts.

Metric names follow the project contract ``risk/<ID>/<metric>`` (for example
``risk/T-02/psi``), so a register item, its measurements and its alerts meet in MLflow.
"""
