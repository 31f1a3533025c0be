"""The application on top of the library: the ``lightning-peft`` command line (:mod:`~lightning_peft.app.commands`,
:mod:`~lightning_peft.app.cli`, ``export``, ``generate``), the ready LightningModules
(:mod:`~lightning_peft.app.tasks`), data modules and their files (:mod:`~lightning_peft.app.datamodules`,
:mod:`~lightning_peft.app.data_files`, :mod:`~lightning_peft.app.tokenization`, the embedded ``data/``), the
prediction writer and optimizers. Nothing in the library imports it."""
