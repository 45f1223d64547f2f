//! gpu-backend
