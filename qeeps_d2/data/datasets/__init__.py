"""The data set readers and their registration: CUHK-SYSU and PRW (official layouts, parsed
with a safe cache), the catalog of names (CUHK-SYSU, PRW, PRW-mini, SynthPS) and the Detectron2
registration of each (:mod:`.builtin`)."""
