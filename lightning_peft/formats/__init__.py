"""Files: the Hugging Face peft adapter directory (:mod:`~lightning_peft.formats.peft_directory`) and atomic
writes (:mod:`~lightning_peft.formats.atomic_io`). Built on the core and the methods' own file mappings."""
