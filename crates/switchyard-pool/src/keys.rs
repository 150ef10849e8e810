//! Which users a backend of a hash ring has: the keys of the requests it was recently picked
//! for, kept in a fixed-size filter, so that a backend set to `retiring` can keep its users
//! while new keys go elsewhere (see [`crate::retire`]).
//!
//! A Bloom filter: a key it was given is always known (no false negatives); a key it was not
//! given is known by mistake at a rate that grows with the keys it holds. It is blocked: a key
//! sets two bits of one 64-bit word, so a request touches one cache line with one load, and
//! writes it (`fetch_or`) only when the key's bits are not set yet. Repeated users, the common
//! case, leave the line shared between cores instead of bouncing it on every request.
//!
//! Memory is bounded by two generations of [`BITS`] bits: the current one records, both are
//! asked. [`KeyFilter::rotate_if_due`] (the retire service, once per period) clears the older
//! one and makes it current, so a key counts as known for one to two periods after its last
//! request. Rotation needs no lock: a request racing a rotation records into either
//! generation, and a key asked during the clearing may be forgotten a moment early, which is
//! what the rotation does anyway. The clearing writes only the words that have bits, so the
//! filter of a backend that takes no request stays untouched memory.
//!
//! False positives with `n` distinct keys per generation (`f(n)` for one generation; both
//! together `1 - (1 - f)^2`), computed for this layout and checked by the tests below:
//! n = 1 000: 0.18 % (0.35 % both); 2 000: 0.51 % (1.0 %); 5 000: 2.3 % (4.6 %);
//! 10 000: 7.3 % (14 %).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use xxhash_rust::xxh3::xxh3_64_with_seed;

/// Bits per generation: 8 KiB, 16 KiB per backend with both.
pub const BITS: usize = 1 << 16;
const WORDS: usize = BITS / 64;
/// A word index takes the hash's top bits.
const WORD_SHIFT: u32 = 64 - WORDS.trailing_zeros();

/// Not the sticky split's seed (0): a sticky route in front of a hash upstream sends it the
/// keys of one interval of seed 0's hashes, which would fill only part of the filter.
const SEED: u64 = 0x5357_4954_4348_5944;

/// `since` before the first rotation tick.
const UNSTAMPED: u64 = u64::MAX;

/// A request key hashed once for the filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct KeyHash(u64);

impl KeyHash {
    pub(crate) fn of(key: &[u8]) -> KeyHash {
        KeyHash(xxh3_64_with_seed(key, SEED))
    }

    fn word(self) -> usize {
        (self.0 >> WORD_SHIFT) as usize
    }

    fn mask(self) -> u64 {
        1 << (self.0 & 63) | 1 << ((self.0 >> 6) & 63)
    }
}

/// The keys one backend was recently picked for.
#[derive(Debug)]
pub struct KeyFilter {
    /// Generation `g` is `words[g * WORDS..][..WORDS]`.
    words: Box<[AtomicU64]>,
    /// Rotations so far; generation `current % 2` records.
    current: AtomicUsize,
    /// When the current generation started, in ms of the rotating clock ([`UNSTAMPED`]
    /// before the first tick).
    since: AtomicU64,
}

impl Default for KeyFilter {
    fn default() -> Self {
        // Zeroed by the allocator rather than word by word: fresh memory need not be written
        // (mimalloc skips clearing it), so the filter of a backend that takes no request
        // need not become resident.
        let words = Box::<[AtomicU64]>::new_zeroed_slice(2 * WORDS);
        // SAFETY: all-zero bytes are a valid `AtomicU64` (it has `u64`'s representation).
        let words = unsafe { words.assume_init() };
        KeyFilter {
            words,
            current: AtomicUsize::new(0),
            since: AtomicU64::new(UNSTAMPED),
        }
    }
}

impl KeyFilter {
    fn word(&self, generation: usize, key: KeyHash) -> &AtomicU64 {
        &self.words[(generation & 1) * WORDS + key.word()]
    }

    /// The backend was picked for `key`. Lock- and allocation-free; a key already recorded
    /// in this generation writes nothing.
    pub(crate) fn record(&self, key: KeyHash) {
        // Acquire, with the rotation's Release: a record into the generation a rotation just
        // made current comes after that rotation's clearing, never before it (and lost).
        let word = self.word(self.current.load(Ordering::Acquire), key);
        let mask = key.mask();
        if word.load(Ordering::Relaxed) & mask != mask {
            word.fetch_or(mask, Ordering::Relaxed);
        }
    }

    /// Whether `key` was recorded in this generation or the one before (or is a false
    /// positive).
    pub(crate) fn knows(&self, key: KeyHash) -> bool {
        let mask = key.mask();
        (0..2).any(|g| self.word(g, key).load(Ordering::Relaxed) & mask == mask)
    }

    /// At `now_ms` of the caller's monotonic clock, starts a new generation when the current
    /// one is `period` old (the first call only starts the clock). Returns how long until the
    /// next one is due. Called by one task only.
    pub(crate) fn rotate_if_due(&self, now_ms: u64, period: Duration) -> Duration {
        let period_ms = u64::try_from(period.as_millis()).unwrap_or(u64::MAX).max(1);
        let since = self.since.load(Ordering::Relaxed);
        // Saturating: a period past u64 milliseconds is `u64::MAX` above.
        let due = since.saturating_add(period_ms);
        if since != UNSTAMPED && now_ms < due {
            return Duration::from_millis(due - now_ms);
        }
        if since != UNSTAMPED {
            let next = self.current.load(Ordering::Relaxed).wrapping_add(1);
            // The older generation is forgotten, then records start into it. Only words with
            // bits are written: a store to every word would make the whole filter resident,
            // even a backend's that never took a request (a load of untouched memory maps the
            // shared zero page).
            for word in &self.words[(next & 1) * WORDS..][..WORDS] {
                if word.load(Ordering::Relaxed) != 0 {
                    word.store(0, Ordering::Relaxed);
                }
            }
            self.current.store(next, Ordering::Release);
        }
        self.since.store(now_ms, Ordering::Relaxed);
        Duration::from_millis(period_ms)
    }
}

/// The bytes [`KeyFilter::encode`] writes.
pub(crate) const ENCODED_LEN: usize = 8 * (1 + 2 * WORDS);

impl KeyFilter {
    /// What the filter holds, for the next process at an upgrade: [`ENCODED_LEN`] bytes.
    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        let current = self.current.load(Ordering::Relaxed) as u64;
        out.extend_from_slice(&current.to_le_bytes());
        for word in &*self.words {
            out.extend_from_slice(&word.load(Ordering::Relaxed).to_le_bytes());
        }
    }

    /// Takes what [`KeyFilter::encode`] wrote at the start of `bytes` (the rotation clock
    /// starts again); returns the bytes after it, or `None` when there are too few.
    pub(crate) fn decode<'a>(&self, bytes: &'a [u8]) -> Option<&'a [u8]> {
        let (mine, rest) = bytes.split_at_checked(ENCODED_LEN)?;
        let mut words = mine
            .chunks_exact(8)
            .map(|c| c.try_into().map(u64::from_le_bytes).unwrap_or_default());
        let current = words.next()?;
        for (word, value) in self.words.iter().zip(words) {
            word.store(value, Ordering::Relaxed);
        }
        // Only the parity matters.
        self.current
            .store((current & 1) as usize, Ordering::Release);
        self.since.store(UNSTAMPED, Ordering::Relaxed);
        Some(rest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(i: u32) -> KeyHash {
        KeyHash::of(format!("user-{i}").as_bytes())
    }

    fn false_positives(filter: &KeyFilter, unknown: std::ops::Range<u32>) -> f64 {
        let n = unknown.len() as f64;
        unknown.filter(|&i| filter.knows(key(i))).count() as f64 / n
    }

    #[test]
    fn recorded_keys_are_known_and_others_rarely() {
        let filter = KeyFilter::default();
        for i in 0..1000 {
            filter.record(key(i));
        }
        assert!(
            (0..1000).all(|i| filter.knows(key(i))),
            "no false negatives"
        );
        let rate = false_positives(&filter, 1_000_000..1_200_000);
        assert!(rate < 0.004, "1 000 keys: {rate}, expected about 0.0018");
        for i in 1000..5000 {
            filter.record(key(i));
        }
        let rate = false_positives(&filter, 1_000_000..1_200_000);
        assert!(
            (0.015..0.032).contains(&rate),
            "5 000 keys: {rate}, expected about 0.023"
        );
    }

    #[test]
    fn a_filter_is_taken_over_whole() {
        let filter = KeyFilter::default();
        filter.record(key(1));
        filter.rotate_if_due(0, Duration::from_secs(1));
        filter.rotate_if_due(1_000, Duration::from_secs(1));
        filter.record(key(2));
        let mut bytes = Vec::new();
        filter.encode(&mut bytes);
        bytes.push(7);
        assert_eq!(bytes.len(), ENCODED_LEN + 1);
        let next = KeyFilter::default();
        assert_eq!(next.decode(&bytes), Some(&[7][..]));
        assert!(next.knows(key(1)) && next.knows(key(2)));
        // The generation that records is the same: the next rotation forgets key 1 only.
        next.rotate_if_due(0, Duration::from_secs(1));
        next.rotate_if_due(1_000, Duration::from_secs(1));
        assert!(!next.knows(key(1)) && next.knows(key(2)));
        assert_eq!(KeyFilter::default().decode(&bytes[..100]), None);
    }

    /// Words of generation `g` that have bits.
    fn set_words(filter: &KeyFilter, g: usize) -> usize {
        let words = &filter.words[(g & 1) * WORDS..][..WORDS];
        words
            .iter()
            .filter(|w| w.load(Ordering::Relaxed) != 0)
            .count()
    }

    #[test]
    fn a_rotation_clears_the_older_generation_whole_and_leaves_an_unused_one_zero() {
        let period = Duration::from_secs(1);
        let filter = KeyFilter::default();
        filter.rotate_if_due(0, period);
        for i in 0..3000 {
            filter.record(key(i));
        }
        assert!(set_words(&filter, 0) > 900, "{}", set_words(&filter, 0));
        filter.rotate_if_due(1_000, period);
        filter.record(key(5000));
        assert_eq!(set_words(&filter, 1), 1);
        filter.rotate_if_due(2_000, period);
        assert_eq!(
            set_words(&filter, 0),
            0,
            "the older generation is cleared whole"
        );
        assert!((0..3000).all(|i| !filter.knows(key(i))));
        assert!(filter.knows(key(5000)));
        // A filter nobody recorded into stays all zero through its rotations.
        let unused = KeyFilter::default();
        for n in 0..4 {
            unused.rotate_if_due(n * 1_000, period);
        }
        assert_eq!(set_words(&unused, 0) + set_words(&unused, 1), 0);
    }

    /// Resident memory of this process, from /proc.
    fn resident_bytes() -> usize {
        let status = std::fs::read_to_string("/proc/self/status").expect("status");
        let kib = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<usize>().ok());
        kib.expect("VmRSS in kB") * 1024
    }

    #[test]
    fn rotating_unused_filters_leaves_them_untouched_memory() {
        let period = Duration::from_secs(1);
        let filters: Vec<KeyFilter> = (0..4000).map(|_| KeyFilter::default()).collect();
        let before = resident_bytes();
        for n in 0..3 {
            for filter in &filters {
                filter.rotate_if_due(n * 1_000, period);
            }
        }
        let grown = resident_bytes().saturating_sub(before);
        // Up to 64 MiB if every word were written (less where the allocator had already
        // written the memory it gave); other tests running meanwhile stay well below the bound.
        assert!(grown < 16 << 20, "rotations made {grown} bytes resident");
    }

    #[test]
    fn a_period_too_long_for_milliseconds_never_overflows() {
        let filter = KeyFilter::default();
        filter.record(key(1));
        assert_eq!(
            filter.rotate_if_due(5_000, Duration::MAX),
            Duration::from_millis(u64::MAX)
        );
        let wait = filter.rotate_if_due(10_000, Duration::MAX);
        assert_eq!(wait, Duration::from_millis(u64::MAX - 10_000));
        assert!(filter.knows(key(1)));
    }

    #[test]
    fn a_key_is_known_for_one_to_two_periods_after_its_last_request() {
        let period = Duration::from_secs(600);
        let filter = KeyFilter::default();
        // The first tick starts the clock and forgets nothing.
        filter.record(key(1));
        assert_eq!(filter.rotate_if_due(5_000, period), period);
        assert!(filter.knows(key(1)));
        assert_eq!(
            filter.rotate_if_due(5_000 + 100_000, period),
            Duration::from_secs(500)
        );

        assert_eq!(filter.rotate_if_due(605_000, period), period);
        assert!(filter.knows(key(1)), "seen in the period before");
        filter.record(key(2));
        // Late ticks rotate once, from when they happen.
        assert_eq!(filter.rotate_if_due(1_300_000, period), period);
        assert!(!filter.knows(key(1)), "not seen for two periods");
        assert!(filter.knows(key(2)));
        filter.record(key(2));
        assert_eq!(filter.rotate_if_due(1_900_000, period), period);
        assert!(filter.knows(key(2)), "seen again in the last period");
        assert_eq!(filter.rotate_if_due(2_500_000, period), period);
        assert!(!filter.knows(key(2)));
    }
}
