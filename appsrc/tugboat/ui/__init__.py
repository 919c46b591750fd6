"""The desktop app: Qt widgets that show state and emit user intent (no torch math here)."""
