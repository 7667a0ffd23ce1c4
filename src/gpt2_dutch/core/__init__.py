"""Foundations every stage stands on: errors, atomic files, devices, the typed options of every command."""
