"""Where the library meets a training loop: Lightning's Trainer (:mod:`~lightning_peft.integrations.callback`),
Lightning Fabric (:mod:`~lightning_peft.integrations.fabric`), Lightning's distributed strategies
(:mod:`~lightning_peft.integrations.distributed`) and gradient checks shared by both
(:mod:`~lightning_peft.integrations.gradient_flow`). No integration knows a single method."""
