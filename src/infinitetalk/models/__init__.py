"""Pure nn.Modules with official parameter names; no file I/O here."""
