"""The engine side: what the gateway talks to, how it is planned, started and watched."""
