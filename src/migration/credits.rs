//! A channel's credit window: how many more batches the destination will take
//! on it before it acknowledges one. A grant past the protocol's ceiling is
//! the peer's error, never a wrap or a saturation.

use crate::wire::MAX_CREDITS;

/// A grant would take the window past [`MAX_CREDITS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a credit grant of {grant} on top of {open} exceeds {MAX_CREDITS}")]
pub struct CreditOverflow {
    /// Credits open before the grant.
    pub open: u16,
    /// The grant.
    pub grant: u16,
}

/// The open credits of one channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Credits {
    open: u16,
}

impl Credits {
    /// A window of `initial` credits, as a bind or the setup granted; `None`
    /// when outside `1..=MAX_CREDITS`.
    pub fn new(initial: u16) -> Option<Self> {
        (1..=MAX_CREDITS)
            .contains(&initial)
            .then_some(Self { open: initial })
    }

    /// Credits open now.
    pub fn open(self) -> u16 {
        self.open
    }

    /// Spends one credit; `false` (and nothing spent) when none is open.
    pub fn take(&mut self) -> bool {
        match self.open.checked_sub(1) {
            Some(n) => {
                self.open = n;
                true
            }
            None => false,
        }
    }

    /// Opens `grant` more credits.
    pub fn grant(&mut self, grant: u16) -> Result<(), CreditOverflow> {
        match self.open.checked_add(grant) {
            Some(n) if n <= MAX_CREDITS => {
                self.open = n;
                Ok(())
            }
            _ => Err(CreditOverflow {
                open: self.open,
                grant,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_window_spends_down_to_zero_and_refuses_to_overflow() {
        assert_eq!(Credits::new(0), None);
        assert_eq!(Credits::new(MAX_CREDITS + 1), None);
        let mut c = Credits::new(2).unwrap();
        assert!(c.take() && c.take());
        assert!(!c.take());
        assert_eq!(c.open(), 0);
        c.grant(MAX_CREDITS).unwrap();
        let e = c.grant(1).unwrap_err();
        assert_eq!((e.open, e.grant), (MAX_CREDITS, 1));
        assert_eq!(c.open(), MAX_CREDITS);
        assert!(c.grant(u16::MAX).is_err());
    }
}
