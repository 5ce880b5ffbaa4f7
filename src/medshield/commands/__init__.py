"""The commands: whole jobs (a run directory in, results and a report out) and the ``medshield``
command line over them. The library (every other package of medshield) never imports them."""
