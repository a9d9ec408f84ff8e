//! What a SQL statement does to session state (placeholder; written next).
