public enum TidepoolCoreVersion { public static let string = "0.1.0" }
