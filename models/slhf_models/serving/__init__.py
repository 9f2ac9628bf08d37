"""What the server loads: chat templates (``templates``), the ``slhf.json`` manifest
(``manifest``) and the resolution of a model folder or Hub id into served weights (``loading``).
Nothing here imports the trainer, the tasks or the evaluation (``tests/unit/test_packaging.py``)."""
