//! A device that runs out of memory. CubeCL's allocator panics on its device thread
//! (`can't allocate buffer of size: N`), after which every call to the device fails with
//! "Communication channel with the server is down" and the process ends in a pile of panics
//! (seen on Qwen3-30B-A3B, 2026-12-02). The panic hook turns the first into one clear error
//! naming what in the recipe lowers the memory, and ends the process with exit code 2. Nothing
//! is left half-written: the run's lock is an `flock` the kernel drops with the process, and
//! checkpoints are written beside their place and renamed into it.

/// What CubeCL's allocator says when it has no memory left for a buffer.
const ALLOCATION_FAILED: &str = "can't allocate buffer of size: ";

/// Exit code of a run that ran out of device memory: the recipe asked for more than the device holds.
pub const OUT_OF_MEMORY_EXIT: i32 = 2;

/// Installs the hook (once, first thing in the CLI); other panics keep the default report.
pub fn install_hook() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let payload = info.payload();
        let text = payload.downcast_ref::<String>().map(String::as_str).or_else(|| payload.downcast_ref::<&str>().copied());
        if let Some(bytes) = text.and_then(allocation_size) {
            eprintln!("{}", message(bytes));
            std::process::exit(OUT_OF_MEMORY_EXIT);
        }
        default(info);
    }));
}

/// The size of the buffer a panic message says CubeCL could not allocate.
fn allocation_size(text: &str) -> Option<u64> {
    let rest = &text[text.find(ALLOCATION_FAILED)? + ALLOCATION_FAILED.len()..];
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

fn message(bytes: u64) -> String {
    format!(
        "error: the device ran out of memory (CubeCL could not allocate {:.1} MiB more).\n  \
         Less is held with a smaller `train.micro_batch_size` (raise gradient accumulation through \
         `train.global_batch_size` to keep the batch), a shorter `train.max_length`, or \
         `train.recompute.granularity = \"full\"`.",
        bytes as f64 / (1024.0 * 1024.0)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_size_from_cubecl_s_message() {
        let text = "called `Result::unwrap()` on an `Err` value: can't allocate buffer of size: 9162240";
        assert_eq!(allocation_size(text), Some(9_162_240));
        assert_eq!(allocation_size("can't allocate buffer of size: 12 bytes"), Some(12));
    }

    #[test]
    fn other_panics_are_not_out_of_memory() {
        assert_eq!(allocation_size("index out of bounds: the len is 3 but the index is 7"), None);
        assert_eq!(allocation_size("can't allocate buffer of size: "), None);
    }

    #[test]
    fn the_message_names_the_size_and_the_recipe_keys() {
        let m = message(9_162_240);
        assert!(m.starts_with("error: the device ran out of memory"), "{m}");
        assert!(m.contains("8.7 MiB"), "{m}");
        for key in ["train.micro_batch_size", "train.max_length", "train.recompute.granularity"] {
            assert!(m.contains(key), "{key} missing: {m}");
        }
    }
}
