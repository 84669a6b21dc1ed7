"""`dk bench` and `dk tune`: suites of teacher-student pairs x methods x seeds, run resumably, tabled honestly."""
