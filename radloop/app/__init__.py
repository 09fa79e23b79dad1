"""The composition root: the `radloop` command line, the wiring of services from settings, the
supervision of child processes (`radloop up`), health probes, the demo and the phantom
generator. The only package that imports every other one; nothing imports it."""
