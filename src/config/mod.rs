//! Typed configuration: node parameters (YAML defaults in `config/`), and later
//! training and model configs.
