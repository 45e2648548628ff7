"""The floor above the engine (`icf.pipeline`) and the stages (`icf.stages`): what needs both.

``run.py`` (`run_pipeline`: index then every stage in order, used by the CLI, the tests and the bench),
``status.py`` (``icf status``), ``verify.py`` (``icf verify``) and ``cli.py`` (the ``icf stage`` commands).
"""
