//! The IoT Hub query language subset (being written).
