"""The data set readers and their registration: CUHK-SYSU and PRW (official layouts, parsed
with a safe cache), custom sets (:mod:`.custom`, one JSON file each; :mod:`.convert` writes the
built-in ones in that format), the catalog of names (CUHK-SYSU, PRW, PRW-mini, SynthPS, custom)
and the Detectron2 registration of each (:mod:`.builtin`)."""
