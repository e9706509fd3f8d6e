"""The evaluation, organised as the five elements of interpretability (Wang et al., IEEE Access 12, 2024).

One module per element — :mod:`.localization`, :mod:`.visual_recognizability`, :mod:`.physical_attribution`,
:mod:`.transparency`, :mod:`.actionability` — over one metric registry (:mod:`.registry`; the catalogue is registered
in :mod:`.results`). :mod:`.evaluator` measures a model through the explanation protocol of ``pellucid.models`` only,
:mod:`.families` adds the families' own measures, :mod:`.callback` runs it during validation and test
(``FiveElementMetrics``), :mod:`.sanity` is the parameter-randomisation check and :mod:`.gates` the localization of
attention gates.
"""
