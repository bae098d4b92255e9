"""Training and selection stages of the Zebra-Llama pipeline (SPEC 4-8): ILD, sensitivity, SMART layer
selection, end-to-end distillation, DPO, and the losses they share. Each stage is a module of plain
functions; the `zebra` subcommands in zebra/commands/ wrap them."""
