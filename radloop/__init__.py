"""The core: settings, domain states and enums, the event vocabulary, model specs, the state
store (tables, engine, migrations). Imports nothing from the packages above it; the
composition root (`radloop.app`) sits on top of everything."""
