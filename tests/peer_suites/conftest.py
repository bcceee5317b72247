# The vendored peer suites import their own library's test tree (relative imports, extra test
# dependencies) and run only through their runners (run_*.py), which prepare a copy of them.
collect_ignore = ["diffusers_amused", "run_diffusers_amused.py"]
