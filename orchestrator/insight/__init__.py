"""Reading a study as a whole: aggregates computed in SQL (:mod:`.aggregates`), means and
95 % intervals (:mod:`.stats`), inline SVG plots (:mod:`.plots`), the report
(:mod:`.report`) and the outcome table ``studyq run`` and ``studyq wait`` end with
(:mod:`.summary`). The report uses them now; a dashboard and ``studyq status --watch`` are
meant to read the same functions."""
