"""Typed models of the contract files, one module per family: ``parse(path, document)`` turns a
schema-valid document into frozen dataclasses and reports cross-reference problems located."""
